"""Fuzzing what switch_sae reads back from disk: saved SAEs, checkpoint resume, the activation cache.

Each seeded case damages one file of a freshly written folder in one way (flip a random
bit, truncate, edit a byte of the safetensors/.npy header, or set a JSON field to a value
of another type or another value), then loads it. The outcome must be one of:

- ``identical``: the data loaded equals what was saved, bit for bit;
- ``refused``: an error (ValueError, FileNotFoundError or CheckpointError) whose message
  names the damaged file;
- ``fell_back`` (resume only): a warning naming the damaged checkpoint, and a resume from
  the older intact one, equal to it bit for bit.

Anything else fails the test: different data without an error (``silent``), an error that
does not name the file (``unclear``) or another exception type (``crash``). The figures
per target are printed (``pytest -s``).

What it leaves out: op inputs (the op fuzz tests) and targeted reproducers
(tests/test_persistence.py).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from switch_sae import SAE, SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig, TrainConfig, Trainer
from switch_sae.activations.cache import ActivationCache, CacheSpec, CacheWriter
from switch_sae.training import CheckpointError

D_IN = 8
CLEAR_ERRORS = (ValueError, FileNotFoundError, CheckpointError)
JSON_VALUES = [0, -1, 1, 7, 2.5, "", "x", "float64", True, False, None, [], {}]


# -- damage ---------------------------------------------------------------------------------


def _header_end(path: Path) -> int:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return 8 + int.from_bytes(data[:8], "little")
    return 10 + int.from_bytes(data[8:10], "little")  # .npy version 1 header


def damage(path: Path, rng: random.Random) -> str:
    """Damage ``path`` in one random way; return a description of what was done."""
    data = bytearray(path.read_bytes())
    kinds = ["flip", "truncate"]
    if path.suffix in (".safetensors", ".npy"):
        kinds.append("header")
    if path.suffix == ".json":
        kinds += ["json", "json"]
    kind = rng.choice(kinds)
    if kind == "flip":
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "header":
        at = rng.randrange(min(_header_end(path), len(data)))
        data[at] = rng.choice(b'0123456789<>fiu{}[]":, abcdefghijklmnopqrstuvwxyz')
    else:
        return edit_json_field(path, rng)
    path.write_bytes(bytes(data))
    return f"{kind} {path.name}"


def edit_json_field(path: Path, rng: random.Random) -> str:
    """Set or delete one field (top level or one level down) of a JSON object file."""
    obj = json.loads(path.read_text())
    holder = obj
    nested = [k for k, v in obj.items() if (isinstance(v, dict) and v) or (isinstance(v, list) and v and isinstance(v[0], dict) and v[0])]
    if nested and rng.random() < 0.5:
        inner = obj[rng.choice(nested)]
        holder = rng.choice(inner) if isinstance(inner, list) else inner
    key = rng.choice(sorted(holder))
    old = holder[key]
    choices = [v for v in JSON_VALUES if v != old or type(v) is not type(old)]
    if isinstance(old, int) and not isinstance(old, bool):
        choices += [old + 1, old * 2]
    if rng.random() < 0.15:
        del holder[key]
        what = f"delete {key}"
    else:
        holder[key] = rng.choice(choices)
        what = f"{key}={holder[key]!r}"
    path.write_text(json.dumps(obj))
    return f"json {path.name}: {what}"


def classify(load: Callable[[], object], same: Callable[[object], bool], damaged: Path) -> str:
    """``identical``, ``refused``, or the failure kinds ``silent`` / ``unclear`` / ``crash``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = load()
    except CLEAR_ERRORS as err:
        return "refused" if str(damaged) in str(err) else f"unclear: {type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - any other exception is the failure being counted
        return f"crash: {type(err).__name__}: {err}"
    return "identical" if same(result) else "silent"


def report(target: str, outcomes: Counter, failures: list[str]) -> None:
    print(f"\nfuzz {target}: {sum(outcomes.values())} cases, " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert not failures, f"{len(failures)} cases neither loaded identical data nor named the file:\n" + "\n".join(failures[:10])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)


def same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return got.keys() == state.keys() and all(bitwise_equal(got[n], t) for n, t in state.items())


# -- saved SAEs -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch, cases", [("switch", 150), ("topk", 75)])
def test_fuzz_sae_load(tmp_path, arch, cases):
    torch.manual_seed(0)
    if arch == "switch":
        model: SAE = SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=2, d_expert=8, k=3, use_encoder_bias=True))
    else:
        model = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=16, k=2))
    model.save(tmp_path / "saved")
    state = {n: t.clone() for n, t in model.state_dict().items()}
    rng, outcomes, failures = random.Random(f"sae-{arch}"), Counter(), []
    for case in range(cases):
        folder = tmp_path / f"case{case}"
        shutil.copytree(tmp_path / "saved", folder)
        victim = folder / rng.choice(["cfg.json", "model.safetensors"])
        what = damage(victim, rng)
        outcome = classify(lambda: SAE.load(folder), lambda m: m.cfg == model.cfg and same_state(m, state), victim)
        outcomes[outcome.split(":")[0]] += 1
        if outcome.split(":")[0] not in ("identical", "refused"):
            failures.append(f"case {case} ({what}): {outcome}")
        shutil.rmtree(folder)
    report(f"{arch} SAE.load", outcomes, failures)


# -- checkpoint resume ----------------------------------------------------------------------


def train_config(run_dir: Path, resume: bool) -> TrainConfig:
    return TrainConfig(total_steps=6, lr=1e-3, progress=False, run_dir=str(run_dir), checkpoint_every=2,
                       keep_checkpoints=3, resume=resume)


def new_model() -> SwitchSAE:
    torch.manual_seed(0)
    return SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=2, d_expert=8, k=3))


def test_fuzz_checkpoint_resume(tmp_path):
    run = tmp_path / "run"
    g = torch.Generator().manual_seed(1)
    Trainer(new_model(), train_config(run, False)).fit([torch.randn(32, D_IN, generator=g) for _ in range(4)])
    states = {step: {n: t.clone() for n, t in SAE.load(run / "checkpoints" / f"step_{step:08d}" / "model").state_dict().items()}
              for step in (2, 4)}
    rng, outcomes, failures = random.Random("resume"), Counter(), []
    for case in range(100):
        folder = tmp_path / f"case{case}"
        shutil.copytree(run, folder)
        newest = folder / "checkpoints" / "step_00000004"
        victim = rng.choice(sorted(p for p in newest.rglob("*") if p.is_file()))
        what = damage(victim, rng)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer = Trainer(new_model(), train_config(folder, True))
            except CLEAR_ERRORS as err:
                outcome = "refused" if str(newest) in str(err) else f"unclear: {err}"
            except Exception as err:  # noqa: BLE001 - counted as a crash
                outcome = f"crash: {type(err).__name__}: {err}"
            else:
                step = trainer.step_count
                warned = any(str(newest) in str(w.message) for w in caught)
                if step == 4 and same_state(trainer.model, states[4]):
                    outcome = "identical"
                elif step == 2 and warned and same_state(trainer.model, states[2]):
                    outcome = "fell_back"
                else:
                    outcome = f"silent: resumed at step {step}, warned={warned}"
        outcomes[outcome.split(":")[0]] += 1
        if outcome.split(":")[0] not in ("identical", "refused", "fell_back"):
            failures.append(f"case {case} ({what}): {outcome}")
        shutil.rmtree(folder)
    report("checkpoint resume", outcomes, failures)


# -- the activation cache -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fuzz_activation_cache(tmp_path, dtype):
    spec = CacheSpec(model_name="m", hook_name="h", d_in=D_IN, dtype=dtype)
    writer = CacheWriter(tmp_path / "saved", spec)
    rows = [torch.randn(6 + i, D_IN, generator=torch.Generator().manual_seed(i)).to(spec.torch_dtype) for i in range(2)]
    for r in rows:
        writer.append(r, contexts=2)
    writer.finish()
    expected = torch.cat(rows)
    rng, outcomes, failures = random.Random(f"cache-{dtype}"), Counter(), []
    for case in range(75):
        folder = tmp_path / f"case{case}"
        shutil.copytree(tmp_path / "saved", folder)
        victim = folder / rng.choice(["manifest.json", "shard_00000.npy", "shard_00001.npy"])
        what = damage(victim, rng)
        if rng.random() < 0.3:  # a harvest resuming into the damaged folder
            def load():
                CacheWriter(folder, spec)
                return ActivationCache(folder, expect=spec)[:]
        else:
            def load():
                return ActivationCache(folder, expect=spec)[:]
        outcome = classify(load, lambda got: bitwise_equal(got, expected), victim)
        outcomes[outcome.split(":")[0]] += 1
        if outcome.split(":")[0] not in ("identical", "refused"):
            failures.append(f"case {case} ({what}): {outcome}")
        shutil.rmtree(folder)
    report(f"{dtype} activation cache", outcomes, failures)
