"""Damaged files are refused naming the file: saved SAEs, checkpoints, metrics, the activation cache.

Each test is one way a file on disk goes wrong (a flipped byte, a truncated file, a
hand-edited config, a file from an older version) and checks that loading either gives
back exactly what was saved or raises an error that names the file, never silently
different data. The randomised versions of these cases are in tests/test_fuzz_files.py.

What it leaves out: the atomic writes themselves (tests/test_training.py kills a run
mid-checkpoint) and the harvest that fills a cache (tests/test_activations.py).
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from switch_sae import SAE, SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig, TrainConfig, Trainer
from switch_sae.activations.cache import MANIFEST, ActivationCache, CacheSpec, CacheWriter
from switch_sae.utils.io import DamagedFileError
from switch_sae.models.base import CHECKSUM_KEY
from switch_sae.training import CheckpointError
from switch_sae.training.metrics import MetricsLogger
from switch_sae.utils.typed_config import config_from_dict

D_IN = 8


def switch_sae(**kw) -> SwitchSAE:
    torch.manual_seed(0)
    return SwitchSAE(SwitchSAEConfig(**{"d_in": D_IN, "n_experts": 2, "d_expert": 8, "k": 3, **kw}))


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_json(path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def raises_naming(path, match: str = ""):
    return pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(path)) + ".*" + match)


# -- saved SAEs ----------------------------------------------------------------------------


def test_flipped_weight_byte_is_refused_naming_the_file(tmp_path):
    model = switch_sae()
    model.save(tmp_path)
    weights = tmp_path / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 5)  # inside W_dec's data: still a valid file
    with raises_naming(weights, "corrupt"):
        SwitchSAE.load(tmp_path)


@pytest.mark.parametrize("field, value", [("dtype", "float64"), ("k", 4), ("n_active", 2), ("hook_name", "blocks.0.x")])
def test_cfg_edited_after_saving_is_refused(tmp_path, field, value):
    switch_sae().save(tmp_path)
    edit_json(tmp_path / "cfg.json", **{field: value})
    with raises_naming(tmp_path / "cfg.json", f"edited after saving.*{field}"):
        SAE.load(tmp_path)


@pytest.mark.parametrize("field, value", [("hook_name", 5), ("use_encoder_bias", "false"), ("k", 3.0), ("d_in", True)])
def test_wrong_typed_cfg_field_is_refused_naming_it(tmp_path, field, value):
    switch_sae().save(tmp_path)
    edit_json(tmp_path / "cfg.json", **{field: value})
    with raises_naming(tmp_path / "cfg.json", f"field '{field}' must be"):
        SAE.load(tmp_path)


@pytest.mark.parametrize("name", ["cfg.json", "model.safetensors"])
def test_truncated_files_are_refused_naming_them(tmp_path, name):
    switch_sae().save(tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with raises_naming(path):
        SAE.load(tmp_path)


def test_invalid_json_and_unknown_fields_name_the_file(tmp_path):
    switch_sae().save(tmp_path)
    cfg = tmp_path / "cfg.json"
    text = cfg.read_text()
    cfg.write_text("[1, 2]")
    with raises_naming(cfg, "JSON object"):
        SAE.load(tmp_path)
    cfg.write_text(text.replace('"k"', '"kk"'))
    with raises_naming(cfg, r"unknown SwitchSAEConfig field\(s\) \['kk'\]"):
        SAE.load(tmp_path)


def old_format_save(model, directory) -> None:
    """A folder as switch_sae wrote it before checksums: no checksum, no config in the weights."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(model.config_dict()))


def test_old_saves_without_a_checksum_load_with_a_warning(tmp_path):
    model = switch_sae(use_encoder_bias=True)
    old_format_save(model, tmp_path / "old")
    with pytest.warns(UserWarning, match="records no checksum"):
        loaded = SAE.load(tmp_path / "old")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t)
    loaded.save(tmp_path / "new")  # saving again adds the checksum
    assert CHECKSUM_KEY in json.loads((tmp_path / "new" / "cfg.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAE.load(tmp_path / "new")


def test_a_deleted_checksum_is_not_taken_for_an_old_save(tmp_path):
    switch_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg[CHECKSUM_KEY]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with raises_naming(tmp_path / "cfg.json", f"lacks the {CHECKSUM_KEY}"):
        SAE.load(tmp_path)


def test_old_saves_still_get_type_dtype_and_shape_checks(tmp_path):
    model = switch_sae()
    old_format_save(model, tmp_path)
    cfg = tmp_path / "cfg.json"
    edit_json(cfg, use_encoder_bias="false")  # truthy string: would end in "missing b_enc"
    with raises_naming(cfg, "use_encoder_bias"):
        SAE.load(tmp_path)
    edit_json(cfg, use_encoder_bias=False, dtype="float64")  # would be silently cast
    with pytest.warns(UserWarning), raises_naming(tmp_path / "model.safetensors", "W_dec is torch.float32"):
        SAE.load(tmp_path)


def test_a_second_architecture_is_checked_the_same_way(tmp_path):
    torch.manual_seed(0)
    TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=16, k=2)).save(tmp_path)
    weights = tmp_path / "model.safetensors"
    flip_byte(weights, 100)
    with raises_naming(weights, "corrupt"):
        TopKSAE.load(tmp_path)


# -- typed configs -------------------------------------------------------------------------


def test_config_from_dict_checks_every_kind_of_annotation():
    assert config_from_dict(TrainConfig, {"total_steps": 3, "lr": None, "adam_betas": [0.9, 0.99]}, "f").adam_betas == (0.9, 0.99)
    assert config_from_dict(TrainConfig, {"total_steps": 3, "lr": 1}, "f").lr == 1  # an int is a float
    for bad in ({"total_steps": 3, "adam_betas": [0.9]}, {"total_steps": 3, "autocast": 1}, {"lr": 1e-3},
                {"total_steps": 3, "resume": 1}, {"total_steps": "3"}):
        with pytest.raises(DamagedFileError, match="^f: "):
            config_from_dict(TrainConfig, bad, "f")
    with pytest.raises(DamagedFileError, match="f: invalid TrainConfig: total_steps"):
        config_from_dict(TrainConfig, {"total_steps": 0}, "f")


# -- checkpoints and metrics ---------------------------------------------------------------


def train(run_dir, steps: int, resume: bool = False) -> Trainer:
    cfg = TrainConfig(total_steps=6, lr=1e-3, progress=False, run_dir=str(run_dir), checkpoint_every=2,
                      keep_checkpoints=3, resume=resume)
    trainer = Trainer(switch_sae(), cfg)
    g = torch.Generator().manual_seed(1)
    trainer.fit([torch.randn(32, D_IN, generator=g) for _ in range(steps)])
    return trainer


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    train(tmp_path, 4)
    newest = tmp_path / "checkpoints" / "step_00000004"
    older = tmp_path / "checkpoints" / "step_00000002"
    flip_byte(newest / "optimizer.safetensors", 200)
    with pytest.warns(UserWarning, match=f"older checkpoint {re.escape(str(older))}.*{re.escape(str(newest))}.*optimizer"):
        trainer = Trainer(switch_sae(), TrainConfig(total_steps=6, lr=1e-3, progress=False, run_dir=str(tmp_path),
                                                    checkpoint_every=2, keep_checkpoints=3, resume=True))
    assert trainer.step_count == 2
    state = SAE.load(older / "model").state_dict()
    assert all(torch.equal(t, state[n]) for n, t in trainer.model.state_dict().items())


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path):
    train(tmp_path, 4)
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "trainer.json").write_text("{")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from is intact.*step_00000004.*step_00000002"):
        train(tmp_path, 4, resume=True)


def test_partial_last_metrics_line_is_dropped_on_resume(tmp_path):
    train(tmp_path, 4)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.3')  # a write cut short by a crash
    with pytest.warns(UserWarning, match="dropping the partial last line 5"):
        train(tmp_path, 6, resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_damaged_metrics_line_in_the_middle_is_an_error_naming_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{re.escape(str(metrics))}: line 2"):
        MetricsLogger(tmp_path, None, False, {}).truncate_after(3)


# -- the activation cache ------------------------------------------------------------------


def write_cache(directory, dtype: str = "float32", shards: int = 2) -> list[torch.Tensor]:
    writer = CacheWriter(directory, CacheSpec(model_name="m", hook_name="h", d_in=D_IN, dtype=dtype))
    rows = [torch.randn(5 + i, D_IN, generator=torch.Generator().manual_seed(i)) for i in range(shards)]
    for r in rows:
        writer.append(r, contexts=1)
    writer.finish()
    return [r.to(writer.manifest.spec.torch_dtype) for r in rows]


def test_cache_flipped_byte_is_refused_on_first_read_by_default(tmp_path):
    write_cache(tmp_path)
    shard = tmp_path / "shard_00001.npy"
    flip_byte(shard, shard.stat().st_size - 3)
    cache = ActivationCache(tmp_path)  # no verify=True: reads are still checked
    cache.shard(0)
    with raises_naming(shard, "corrupt"):
        cache.shard(1)
    with raises_naming(shard, "corrupt"):
        cache[len(cache) - 1]


def test_cache_header_dtype_edit_is_refused(tmp_path):
    write_cache(tmp_path)
    shard = tmp_path / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes().replace(b"<f4", b"<i4"))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = __import__("hashlib").sha256(shard.read_bytes()).hexdigest()
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))  # even with a matching checksum
    with raises_naming(shard, "holds int32"):
        ActivationCache(tmp_path).shard(0)


def test_cache_verifies_each_shard_once_per_process(tmp_path, monkeypatch):
    rows = write_cache(tmp_path)
    from switch_sae.activations import cache as cache_module

    hashed = []
    real = cache_module.check_sha256
    monkeypatch.setattr(cache_module, "check_sha256", lambda p, *a: (hashed.append(p.name), real(p, *a)))
    monkeypatch.setattr(cache_module, "_VERIFIED", set())
    for _ in range(2):
        cache = ActivationCache(tmp_path)
        assert torch.equal(torch.cat(list(cache)), torch.cat(rows))
    assert sorted(hashed) == ["shard_00000.npy", "shard_00001.npy"]


def test_cache_writer_refuses_to_reopen_a_damaged_cache(tmp_path):
    write_cache(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["complete"] = False
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    shard = tmp_path / "shard_00000.npy"
    flip_byte(shard, shard.stat().st_size - 1)
    with raises_naming(shard, "corrupt"):
        CacheWriter(tmp_path, CacheSpec(model_name="m", hook_name="h", d_in=D_IN))
    spec = {"model_name": "m", "hook_name": "h", "d_in": "8"}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "switch_sae.activation_cache/1", "spec": spec}))
    with raises_naming(tmp_path / MANIFEST, "d_in"):
        CacheWriter(tmp_path, CacheSpec(model_name="m", hook_name="h", d_in=D_IN))


def test_cache_bfloat16_round_trips_through_the_checks(tmp_path):
    rows = write_cache(tmp_path, dtype="bfloat16")
    cache = ActivationCache(tmp_path, verify=True)
    assert torch.equal(torch.cat(list(cache)), torch.cat(rows))
    assert np.load(tmp_path / "shard_00000.npy").dtype == np.uint16
