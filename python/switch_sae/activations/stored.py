"""Activations someone already stored, read back as ``[rows, d_in]`` chunks for training.

``open_activations(path)`` recognises three layouts:

- this library's activation cache (a folder with ``manifest.json``, see ``cache``);
- a folder of ``.npy`` or ``.safetensors`` shards, read in name order, each ``[rows, d_in]``
  (or ``[n, context, d_in]``, flattened); a ``.safetensors`` shard holds one tensor, or
  several of which the one named ``activations`` (or ``column``) is read;
- a Hugging Face ``datasets`` dataset saved to disk (``save_to_disk``), as SAELens's
  ``CacheActivationsRunner`` writes it: one ``Array2D(context_size, d_in)`` column named
  after the hook plus ``token_ids``. The activation column is ``column`` if given, else
  the only floating-point column.

Every shard's shape and dtype is checked when the folder is opened (headers only, nothing
is loaded), and a mismatch is a ValueError naming the file. The result iterates like the
cache: re-iterable, one memory-mapped shard (or dataset slice) at a time, so it feeds a
``ShufflingBuffer`` and from there ``Trainer.fit``, with no language model involved.

What it leaves out: writing activations (``cache``) and shuffling (``buffer``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .cache import MANIFEST, ActivationCache

DATASET_ROWS_PER_CHUNK = 64  # SAELens rows are whole contexts: 64 x context_size tokens per read
FLOAT_NAMES = ("float16", "float32", "float64", "bfloat16")


@dataclass
class StoredActivations:
    """Re-iterable ``[rows, d_in]`` float chunks of stored activations."""

    path: Path
    d_in: int
    n_rows: int
    hook_name: str
    """Hook the activations were read at, where the storage records it (else empty)."""
    model_name: str
    """Model the activations came from, where the storage records it (else empty)."""
    chunks: Callable[[], Iterator[Tensor]]

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self) -> Iterator[Tensor]:
        return self.chunks()

    def rows(self, start: int, stop: int) -> "StoredActivations":
        """Rows ``[start, stop)`` only (e.g. one process's share), read chunk by chunk as before."""
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows [{start}, {stop}) are not within the {self.n_rows} stored rows of {self.path}")

        def chunks() -> Iterator[Tensor]:
            seen = 0
            for chunk in self.chunks():
                first, seen = seen, seen + chunk.shape[0]
                if max(start, first) < min(stop, seen):  # the chunk overlaps the rows asked for
                    yield chunk[max(start - first, 0) : stop - first]
                if seen >= stop:
                    return

        return dataclasses.replace(self, n_rows=stop - start, chunks=chunks)


def check_shape(shape: tuple[int, ...], dtype: str, where: Path | str, d_in: int | None) -> tuple[int, int]:
    """``(rows, d_in)`` of a ``[rows, d_in]`` or ``[n, context, d_in]`` float array, or a ValueError naming it."""
    if dtype not in FLOAT_NAMES:
        raise ValueError(f"{where}: activations must be floating point ({', '.join(FLOAT_NAMES)}), got dtype {dtype}")
    if len(shape) not in (2, 3) or 0 in shape:
        raise ValueError(f"{where}: activations must have shape [rows, d_in] or [n, context, d_in], got {list(shape)}")
    if d_in is not None and shape[-1] != d_in:
        raise ValueError(f"{where}: activations have d_in={shape[-1]}, but earlier shards have d_in={d_in}")
    return int(np.prod(shape[:-1])), int(shape[-1])


def _npy_header(path: Path) -> tuple[tuple[int, ...], str]:
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    return array.shape, str(array.dtype)


def _safetensors_key(path: Path, handle: Any, column: str | None) -> str:
    keys = list(handle.keys())
    wanted = column or "activations"
    if wanted in keys:
        return wanted
    if len(keys) == 1 and column is None:
        return keys[0]
    raise ValueError(f"{path}: holds tensors {keys}; name the activation tensor 'activations' or pass its name as the column")


def _safetensors_header(path: Path, column: str | None) -> tuple[tuple[int, ...], str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            key = _safetensors_key(path, handle, column)
            piece = handle.get_slice(key)
            return tuple(piece.get_shape()), {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16"}.get(
                piece.get_dtype(), piece.get_dtype().lower())
    except (OSError, RuntimeError) as err:  # safetensors raises these for a damaged header
        raise ValueError(f"{path}: not a readable .safetensors file ({err})") from err


def _read_shard(path: Path, column: str | None, d_in: int) -> Tensor:
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(array)).reshape(-1, d_in)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(_safetensors_key(path, handle, column)).reshape(-1, d_in)


def open_shard_folder(folder: Path, column: str | None) -> StoredActivations:
    shards = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".safetensors"))
    kinds = {p.suffix for p in shards}
    if len(kinds) > 1:
        raise ValueError(f"{folder}: mixes .npy and .safetensors shards; keep one kind per folder")
    d_in, n_rows = None, 0
    for shard in shards:
        shape, dtype = _npy_header(shard) if shard.suffix == ".npy" else _safetensors_header(shard, column)
        rows, d_in = check_shape(shape, dtype, shard, d_in)
        n_rows += rows

    def chunks() -> Iterator[Tensor]:
        for shard in shards:
            yield _read_shard(shard, column, d_in)

    return StoredActivations(folder, d_in, n_rows, "", "", chunks)


def _activation_column(path: Path, dataset: Any, column: str | None) -> str:
    floating = [name for name, feature in dataset.features.items() if getattr(feature, "dtype", "") in FLOAT_NAMES]
    if column is not None:
        if column not in dataset.column_names:
            raise ValueError(f"{path}: the dataset has no column {column!r}; its columns are {dataset.column_names}")
        return column
    if len(floating) != 1:
        raise ValueError(f"{path}: cannot tell the activation column among {dataset.column_names}; pass its name (the hook name)")
    return floating[0]


def open_hf_dataset(path: Path, column: str | None) -> StoredActivations:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(dataset)})")
        dataset = dataset["train"]
    name = _activation_column(path, dataset, column)
    feature = dataset.features[name]
    shape = tuple(getattr(feature, "shape", ()) or ())
    dtype = str(getattr(feature, "dtype", "unknown"))
    _, d_in = check_shape((len(dataset), *shape), dtype, f"{path} column {name!r}", None)
    table = dataset.with_format("torch", columns=[name])

    def chunks() -> Iterator[Tensor]:
        for start in range(0, len(table), DATASET_ROWS_PER_CHUNK):
            yield table[start : start + DATASET_ROWS_PER_CHUNK][name].reshape(-1, d_in)

    n_rows = int(np.prod((len(dataset), *shape[:-1])))
    return StoredActivations(path, d_in, n_rows, name if "hook_" in name else "", "", chunks)


def open_activations(path: str | Path, *, column: str | None = None) -> StoredActivations:
    """Open stored activations at ``path`` (see the module docstring for the layouts)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"activations {path} is not a folder (an activation cache, a folder of .npy/.safetensors shards, or a saved datasets dataset)")
    if (path / MANIFEST).is_file():
        cache = ActivationCache(path)
        spec = cache.spec
        return StoredActivations(path, spec.d_in, len(cache), spec.hook_name, spec.model_name, cache.__iter__)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return open_hf_dataset(path, column)
    if any(p.suffix in (".npy", ".safetensors") for p in path.iterdir()):
        return open_shard_folder(path, column)
    raise ValueError(f"{path}: no activations found: expected {MANIFEST}, a saved datasets dataset (dataset_info.json), or .npy/.safetensors shards")
