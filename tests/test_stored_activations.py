"""Training from stored activations: this library's cache, .npy/.safetensors shard folders and
SAELens-style ``datasets`` folders, read without a language model, with shape/dtype errors
that name the file; and ``switch-sae train --activations`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from switch_sae import cli
from switch_sae.activations import CacheSpec, ShufflingBuffer, build_cache, open_activations
from switch_sae.activations.text import batched

from lm_models import D_MODEL, D_VOCAB

HOOK = "blocks.1.hook_resid_post"


def rows_of(stored):
    return torch.cat([chunk.float() for chunk in stored])


@pytest.fixture
def harvested_cache(tiny_lm, tmp_path):
    """A cache written by an earlier harvest of the tiny model."""
    tokens = torch.randint(1, D_VOCAB, (16, 9), generator=torch.Generator().manual_seed(0))
    spec = CacheSpec(model_name="tiny", hook_name=HOOK, d_in=D_MODEL, context_size=9, drop_first=True)
    cache = build_cache(tiny_lm, batched(iter(tokens), 4), tmp_path / "cache", spec, shard_tokens=40, progress=False)
    return cache


def test_reads_this_librarys_cache(harvested_cache):
    stored = open_activations(harvested_cache.directory)
    assert (stored.d_in, len(stored), stored.hook_name, stored.model_name) == (D_MODEL, 16 * 8, HOOK, "tiny")
    assert torch.equal(rows_of(stored), harvested_cache[:].float())
    assert torch.equal(rows_of(stored), rows_of(stored))  # re-iterable


def test_train_from_a_cache_without_a_language_model(harvested_cache, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("training from stored activations must not load a language model")

    import switch_sae.activations.pipeline

    monkeypatch.setattr(switch_sae.activations.pipeline, "load_language_model", refuse)
    monkeypatch.setattr(switch_sae.activations.default_model, "load_model", refuse)
    run = tmp_path / "run"
    argv = ["train", "switch", "--activations", str(harvested_cache.directory), "--n-experts", "2", "--d-expert", "8",
            "--k", "2", "--batch-size", "32", "--epochs", "2", "--out", str(run), "--no-progress"]
    assert cli.main(argv) == 0
    config = json.loads((run / "sae" / "cfg.json").read_text())
    assert (config["d_in"], config["hook_name"], config["model_name"]) == (D_MODEL, HOOK, "tiny")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 * (128 // 32)
    assert "not evaluated" in capsys.readouterr().out


def test_npy_and_safetensors_shard_folders(tmp_path):
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(10, D_MODEL, generator=generator), torch.randn(2, 3, D_MODEL, generator=generator)]
    npy, st = tmp_path / "npy", tmp_path / "st"
    npy.mkdir(), st.mkdir()
    for i, part in enumerate(parts):
        np.save(npy / f"shard_{i}.npy", part.numpy().astype(np.float16))
        save_file({"activations": part.to(torch.bfloat16), "token_ids": torch.zeros(3, dtype=torch.int64)}, st / f"s{i}.safetensors")
    expected = torch.cat([p.reshape(-1, D_MODEL) for p in parts])
    for folder, dtype in ((npy, torch.float16), (st, torch.bfloat16)):
        stored = open_activations(folder)
        assert (stored.d_in, len(stored)) == (D_MODEL, 16)
        assert torch.equal(rows_of(stored), expected.to(dtype).float())


def test_saelens_style_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    context, n = 6, 5
    acts = torch.randn(n, context, D_MODEL, generator=torch.Generator().manual_seed(0))
    features = datasets.Features({HOOK: datasets.Array2D(shape=(context, D_MODEL), dtype="float32"),
                                  "token_ids": datasets.Sequence(datasets.Value("int32"), length=context)})
    table = datasets.Dataset.from_dict({HOOK: acts.numpy(), "token_ids": np.zeros((n, context), dtype=np.int32)}, features=features)
    table.save_to_disk(str(tmp_path / "saelens"))
    stored = open_activations(tmp_path / "saelens")
    assert (stored.d_in, len(stored), stored.hook_name) == (D_MODEL, n * context, HOOK)
    assert torch.allclose(rows_of(stored), acts.reshape(-1, D_MODEL))
    # From Python, as an iterable of shuffled training batches.
    batches = list(ShufflingBuffer(stored, capacity=16, batch_size=8, drop_last=True))
    assert len(batches) == n * context // 8 and all(b.shape == (8, D_MODEL) for b in batches)


def test_errors_name_the_file(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, D_MODEL), np.float32))
    np.save(folder / "b.npy", np.zeros((4, D_MODEL + 1), np.float32))
    with pytest.raises(ValueError, match=r"b\.npy.*d_in=17.*d_in=16"):
        open_activations(folder)
    np.save(folder / "b.npy", np.zeros((4, D_MODEL), np.int32))
    with pytest.raises(ValueError, match=r"b\.npy.*floating point.*int32"):
        open_activations(folder)
    np.save(folder / "b.npy", np.zeros(D_MODEL, np.float32))
    with pytest.raises(ValueError, match=r"b\.npy.*shape"):
        open_activations(folder)
    (folder / "b.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"b\.npy.*not a readable"):
        open_activations(folder)
    (folder / "b.npy").unlink()
    save_file({"x": torch.zeros(2, D_MODEL), "y": torch.zeros(2, D_MODEL)}, folder / "c.safetensors")
    with pytest.raises(ValueError, match="mixes"):
        open_activations(folder)
    (folder / "a.npy").unlink()
    with pytest.raises(ValueError, match=r"c\.safetensors.*\['x', 'y'\]"):
        open_activations(folder)
    assert len(open_activations(folder, column="y")) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no activations found"):
        open_activations(empty)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        open_activations(tmp_path / "missing")


def test_cli_reports_bad_stored_activations(tmp_path, capsys):
    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, 3, 2), np.int64))
    assert cli.main(["train", "topk", "--activations", str(folder), "--d-sae", "8", "--k", "2", "--out", str(tmp_path / "r")]) == cli.EXIT_USAGE
    assert "a.npy" in capsys.readouterr().err
