"""Training checkpoints: safetensors + JSON only, written atomically, verified on load.

A checkpoint is a folder ``<root>/step_<step>/``::

    model/cfg.json, model/model.safetensors   the SAE (``SAE.save``)
    optimizer.safetensors, optimizer.json     the optimiser's tensors; its param groups and scalars
    trainer.safetensors                       dead-latent counters, torch RNG state(s)
    trainer.json                              step, tokens, data position, input scale, config
    manifest.json                             sha256 of every file above; written last

An expert-parallel run (``switch_sae.parallel``) writes the files above once per process,
into ``rank_00000/``, ``rank_00001/``, ..., and one manifest covering them all, which also
records the world size.

It is assembled in a hidden temporary folder and renamed into place, so a crash leaves
either no new checkpoint or a complete one; the manifest (checked on load) also catches
later damage, and resuming falls back to the newest checkpoint that passes it. Nothing is
pickled, so loading a checkpoint cannot run code.

What it leaves out: deciding when to checkpoint and what the trainer state means
(``trainer.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.base import CHECKSUM_KEY, CONFIG_FILE, WEIGHTS_FILE, SAE, load_weights
from ..models.sharded import rank_folder
from ..utils.io import (
    DamagedFileError,
    atomic_write_json,
    atomic_write_safetensors,
    check_sha256,
    read_json_object,
    read_safetensors,
    sha256_file,
)

MANIFEST = "manifest.json"
FORMAT = "switch_sae.checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged, or does not match the run resuming from it."""


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, key = flat.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned the tuples of a group's settings (Adam's betas) into lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, Tensor]:
    """Torch's RNG states (CPU, and each CUDA device when present) as uint8 tensors."""
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    root: str | Path,
    step: int,
    model: SAE,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``<root>/step_<step>`` atomically and keep only the ``keep`` newest checkpoints.

    ``tensors`` and ``state`` are the trainer's own tensors and JSON-able counters.
    """
    staging = staging_folder(root, step)
    shutil.rmtree(staging, ignore_errors=True)  # debris of a crash mid-write
    write_files(staging, model, optimizer, tensors, state)
    return publish(root, step, digests(staging), keep)


def staging_folder(root: str | Path, step: int) -> Path:
    """The hidden folder where the checkpoint of ``step`` is assembled before the rename."""
    return Path(root) / f".{step_folder(step)}.tmp"


def step_folder(step: int) -> str:
    return f"step_{step:08d}"


def write_files(
    folder: Path, model: SAE, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], state: dict[str, Any]
) -> None:
    """The model, optimiser and trainer files of one checkpoint (of one process) into ``folder``."""
    model.save(folder / "model")
    opt_tensors, opt_meta = _optimizer_files(optimizer)
    atomic_write_safetensors(opt_tensors, folder / "optimizer.safetensors")
    atomic_write_json(opt_meta, folder / "optimizer.json")
    atomic_write_safetensors({**tensors, **rng_state()}, folder / "trainer.safetensors")
    atomic_write_json(state, folder / "trainer.json")


def digests(folder: Path, prefix: str = "") -> dict[str, str]:
    """``{prefix + relative path: sha256}`` of every file under ``folder``."""
    return {prefix + p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def publish(root: str | Path, step: int, files: dict[str, str], keep: int, world_size: int | None = None) -> Path:
    """Write the manifest of the staged checkpoint ``step`` (``files``: its digests; ``world_size``:
    how many processes wrote a ``rank_*`` folder each, None for one checkpoint), rename it into
    place, keep only the ``keep`` newest checkpoints and remove what crashed saves left."""
    root = Path(root)
    staging, final = staging_folder(root, step), root / step_folder(step)
    manifest = {"format": FORMAT, "step": step, "files": files}
    if world_size is not None:
        manifest["world_size"] = world_size
    atomic_write_json(manifest, staging / MANIFEST)
    install_folder(staging, final)  # replaces a re-saved step (e.g. Ctrl-C right after a periodic save)
    for stale in checkpoints(root)[:-keep]:
        shutil.rmtree(stale)
    # Hidden folders of other steps are what a crash mid-save left (staged, or set aside by
    # install_folder); no one else writes here while this run does.
    for debris in (*root.glob(".step_*.tmp"), *root.glob(".step_*.old")):
        shutil.rmtree(debris, ignore_errors=True)
    return final


def install_folder(staging: Path, final: Path) -> None:
    """Rename the complete folder ``staging`` to ``final``, replacing any folder already there."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HINT = "delete it to resume from an earlier checkpoint, or start a fresh run"


def verify(path: str | Path) -> dict[str, Any]:
    """Check the manifest of checkpoint ``path``; return it or raise ``CheckpointError``."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}); {_HINT}")
    try:
        manifest = read_json_object(manifest_path)
        if manifest.get("format") != FORMAT:
            raise DamagedFileError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
        files = manifest.get("files")
        required = {"trainer.json", f"model/{CONFIG_FILE}"}
        if "world_size" in manifest:  # one folder per process of a sharded run
            required = {f"{rank_folder(r)}/{name}" for r in range(int(manifest["world_size"])) for name in required}
        if not isinstance(files, dict) or not required <= files.keys():
            raise DamagedFileError(f"{manifest_path} does not list the checkpoint's files")
        for name, digest in files.items():
            check_sha256(path / name, digest, manifest_path)
    except DamagedFileError as err:
        raise CheckpointError(f"checkpoint {path} is damaged: {err}; {_HINT}") from err
    return manifest


def newest_valid(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes ``verify`` (None if there is none).

    Damaged newer ones are skipped with a warning naming them and the one used; if every
    checkpoint is damaged, ``CheckpointError`` lists why.
    """
    damaged: list[CheckpointError] = []
    for path in reversed(checkpoints(root)):
        try:
            verify(path)
        except CheckpointError as err:
            damaged.append(err)
            continue
        if damaged:
            reasons = "; ".join(str(e) for e in damaged)
            warnings.warn(f"resuming from the older checkpoint {path} because newer ones are damaged: {reasons}",
                          stacklevel=2)
        return path
    if damaged:
        raise CheckpointError("no checkpoint to resume from is intact: " + "; ".join(str(e) for e in damaged))
    return None


def read_state(path: str | Path) -> dict[str, Any]:
    """The trainer's JSON state of a verified checkpoint."""
    return read_json_object(Path(path) / "trainer.json")


def load_checkpoint(
    path: str | Path, model: SAE, optimizer: torch.optim.Optimizer, verified: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verify ``path`` (unless the caller just did), load the model and optimizer in place,
    restore the RNG.

    Returns the trainer's tensors and JSON state. The checkpoint's model config must equal
    ``model``'s, or ``CheckpointError`` says which fields differ.
    """
    path = Path(path)
    if not verified:
        verify(path)
    saved_cfg = read_json_object(path / "model" / CONFIG_FILE)
    saved_cfg.pop(CHECKSUM_KEY, None)  # the manifest already vouches for the weights
    current = json.loads(json.dumps(model.config_dict()))
    if saved_cfg != current:
        keys = saved_cfg.keys() | current.keys()
        diff = {k: (saved_cfg.get(k), current.get(k)) for k in keys if saved_cfg.get(k) != current.get(k)}
        raise CheckpointError(f"checkpoint {path} holds a different model; (saved, current) differ in {diff}")
    try:
        load_weights(model, path / "model" / WEIGHTS_FILE)
        opt_tensors, _ = read_safetensors(path / "optimizer.safetensors")
        _load_optimizer(optimizer, opt_tensors, read_json_object(path / "optimizer.json"))
        tensors, _ = read_safetensors(path / "trainer.safetensors")
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {err}") from err
    set_rng_state(tensors)
    return tensors, read_state(path)
