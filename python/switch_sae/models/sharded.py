"""An SAE saved in shards, one per process of an expert-parallel run, and loading it whole.

A sharded SAE folder holds one ordinary SAE folder per process (``rank_00000/``, ...: its
``cfg.json`` is the whole SAE's config, its ``model.safetensors`` that process's experts and,
like every process, the replicated tensors) and ``shards.json``, written last, naming them::

    {"format": "switch_sae.sharded_sae/1", "world_size": 2,
     "shards": ["rank_00000", "rank_00001"], "expert_parameters": ["W_enc", "W_dec"]}

``SAE.load`` of such a folder checks every shard as it checks a plain folder (checksum,
config), concatenates the expert tensors in rank order, takes the replicated ones from the
first shard, and returns the whole SAE: one process can load what any number wrote.

What it leaves out: writing the shards from a running job (``switch_sae.parallel.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.io import DamagedFileError, read_json_object, read_safetensors

SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "switch_sae.sharded_sae/1"
# Parameters whose first dimension is the expert: what an expert-parallel process holds a slice of.
EXPERT_PARAMETERS = ("W_enc", "W_dec", "b_enc", "feature_w")


def rank_folder(rank: int) -> str:
    return f"rank_{rank:05d}"


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS_FILE).is_file()


def shards_manifest(world_size: int, expert_parameters: list[str]) -> dict[str, Any]:
    return {
        "format": SHARDS_FORMAT,
        "world_size": world_size,
        "shards": [rank_folder(r) for r in range(world_size)],
        "expert_parameters": expert_parameters,
    }


def read_shards(directory: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """The first shard's folder (for the config) and the whole SAE's tensors."""
    from .base import read_saved_config, WEIGHTS_FILE  # base imports this module

    directory = Path(directory)
    manifest_path = directory / SHARDS_FILE
    manifest = read_json_object(manifest_path)
    if manifest.get("format") != SHARDS_FORMAT or not isinstance(manifest.get("shards"), list):
        raise DamagedFileError(f"{manifest_path} has format {manifest.get('format')!r}, expected {SHARDS_FORMAT!r}")
    folders = [directory / name for name in manifest["shards"]]
    configs, parts = [], []
    for folder in folders:
        if not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder / WEIGHTS_FILE} is missing: {manifest_path} lists it as a shard")
        configs.append(read_saved_config(folder)[1])  # checks its checksum and config
        parts.append(read_safetensors(folder / WEIGHTS_FILE)[0])
    if any(c != configs[0] for c in configs):
        raise DamagedFileError(f"the shards listed in {manifest_path} were saved with different configs")
    sharded = set(manifest["expert_parameters"])
    state = {name: torch.cat([part[name] for part in parts]) if name in sharded else tensor
             for name, tensor in parts[0].items()}
    return folders[0], state
