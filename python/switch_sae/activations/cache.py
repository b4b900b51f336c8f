"""An on-disk activation cache: harvest once, train many SAEs on the same activations.

Layout of a cache folder::

    manifest.json        what the activations are and which shards hold them
    shard_00000.npy      [rows, d_in] activations (NumPy .npy, read memory-mapped)
    shard_00001.npy      ...

The manifest records the model, hook, dtype, ``d_in``, context size and BOS settings, the
token count, and per shard its row count and SHA-256. Each shard is written to a temporary
file and renamed into place, then the manifest is rewritten (also atomically) to list it:
a crash leaves at most an unlisted shard, which the next writer overwrites. So an
interrupted harvest resumes from the last listed shard (``build_cache`` skips the contexts
already stored), and opening a cache for a different model/hook/dtype/d_in is an error
that names the field, never silent mixing.

bfloat16 has no NumPy dtype: it is stored as its raw 16 bits (uint16) and viewed back.

Reads are checked: every shard's dtype and shape against the manifest when it is opened,
and its SHA-256 once per process, on first read (``verify=True`` checks all of them up
front). A writer checks the shards already listed before it appends to a cache. Every
error names the shard file.

What it leaves out: shuffling (``buffer``; pass the cache as the buffer's source).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..utils.checks import check_int
from ..utils.io import DamagedFileError, atomic_write, atomic_write_json, check_sha256, read_json_object, sha256_file
from ..utils.typed_config import config_from_dict
from .harvest import iter_activations

MANIFEST = "manifest.json"
FORMAT = "switch_sae.activation_cache/1"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "bfloat16": torch.bfloat16}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16}
_SHARD_FIELDS = {"file": str, "rows": int, "contexts": int, "sha256": str}


@dataclass
class CacheSpec:
    """What a cache holds; two harvests with equal specs produce interchangeable caches."""

    model_name: str
    """Model the activations come from."""
    hook_name: str
    """TransformerLens hook name."""
    d_in: int
    """Activation width (after flattening attention heads)."""
    dtype: str = "float32"
    """Stored dtype: float32, float16, bfloat16 or float64."""
    context_size: int = 0
    """Tokens per context (0 if unknown)."""
    prepend_bos: bool = True
    """Whether each context starts with a BOS token."""
    drop_first: bool = False
    """Whether the first position of each context was dropped."""
    source: str = ""
    """Free-form description of the text the tokens came from."""

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in)
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {self.dtype!r}")
        if not self.hook_name:
            raise ValueError("hook_name must be a non-empty hook name")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]


@dataclass
class Manifest:
    """Contents of ``manifest.json``: the spec and the shards written so far."""

    spec: CacheSpec
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Per shard: file, rows, contexts, sha256."""
    complete: bool = False
    """True once the harvest reached its target; a cache that is not complete can be resumed."""

    @property
    def n_tokens(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def n_contexts(self) -> int:
        return sum(s["contexts"] for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "spec": asdict(self.spec), "shards": self.shards, "complete": self.complete,
                "n_tokens": self.n_tokens, "n_contexts": self.n_contexts}

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        data = read_json_object(path)
        if data.get("format") != FORMAT:
            raise DamagedFileError(f"{path} is not a {FORMAT} manifest (format={data.get('format')!r})")
        spec = config_from_dict(CacheSpec, data.get("spec"), path)
        shards, complete = data.get("shards"), data.get("complete")
        if not isinstance(shards, list) or not isinstance(complete, bool):
            raise DamagedFileError(f"{path}: 'shards' must be a list and 'complete' a boolean")
        for number, shard in enumerate(shards):
            ok = isinstance(shard, dict) and all(
                isinstance(shard.get(k), t) and not isinstance(shard.get(k), bool) for k, t in _SHARD_FIELDS.items()
            )
            if not ok or shard["file"] != f"shard_{number:05d}.npy" or shard["rows"] < 0 or shard["contexts"] < 0:
                raise DamagedFileError(f"{path}: shard entry {number} is malformed: {shard!r}")
        return cls(spec, list(shards), complete)


# Shards whose checksum this process has already checked, by (path, sha256, size, mtime):
# a shard is hashed once per process, and again only if its file changes.
_VERIFIED: set[tuple[str, str, int, int]] = set()


def _verify_once(path: Path, shard: dict[str, Any], manifest_path: Path) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DamagedFileError(f"activation cache shard {path} is missing (it is listed in {manifest_path})") from None
    key = (str(path.resolve()), shard["sha256"], stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        check_sha256(path, shard["sha256"], manifest_path)
        _VERIFIED.add(key)


def open_shard(directory: Path, shard: dict[str, Any], spec: CacheSpec) -> np.ndarray:
    """Memory-map one shard after checking its checksum (once per process), dtype and shape."""
    path = directory / shard["file"]
    _verify_once(path, shard, directory / MANIFEST)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DamagedFileError(f"activation cache shard {path} is not a readable .npy file: {err}") from err
    expected = (np.dtype(_NUMPY_DTYPES[spec.dtype]), (shard["rows"], spec.d_in))
    if (array.dtype, array.shape) != expected or not array.flags.c_contiguous:
        raise DamagedFileError(
            f"activation cache shard {path} holds {array.dtype} {array.shape} but {directory / MANIFEST} "
            f"says {expected[0]} {expected[1]} ({spec.dtype}, C order)"
        )
    return array


def _to_numpy(rows: Tensor) -> np.ndarray:
    rows = rows.detach().cpu().contiguous()
    if rows.dtype == torch.bfloat16:
        return rows.view(torch.uint16).numpy()
    return rows.numpy()


def check_spec(found: CacheSpec, expected: CacheSpec, where: Path) -> None:
    """Raise a ValueError naming every field where the cache differs from what is asked for."""
    diffs = [
        f"{name}: cache has {getattr(found, name)!r}, asked for {getattr(expected, name)!r}"
        for name in ("model_name", "hook_name", "d_in", "dtype", "context_size", "prepend_bos", "drop_first")
        if getattr(found, name) != getattr(expected, name)
    ]
    if diffs:
        raise ValueError(f"activation cache {where / MANIFEST} does not match: " + "; ".join(diffs) + ". Use another folder or delete it.")


class ActivationCache:
    """Read a cache folder: ``len``, ``cache[i]`` rows, and iteration over shards as tensors.

    Shards are memory-mapped, so opening a cache bigger than RAM is fine; ``expect`` checks
    the spec. Each shard's checksum is checked on its first read in this process;
    ``verify=True`` checks every shard when the cache is opened instead.
    """

    def __init__(self, directory: str | Path, *, expect: CacheSpec | None = None, verify: bool = False) -> None:
        self.directory = Path(directory)
        if not (self.directory / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.directory} has no {MANIFEST}: not an activation cache (build one with build_cache)")
        self.manifest = Manifest.read(self.directory)
        if expect is not None:
            check_spec(self.manifest.spec, expect, self.directory)
        if verify:
            self.verify()
        self._arrays: list[np.ndarray | None] = [None] * len(self.manifest.shards)
        self._starts = np.cumsum([0] + [s["rows"] for s in self.manifest.shards])

    @property
    def spec(self) -> CacheSpec:
        return self.manifest.spec

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    def __len__(self) -> int:
        return self.manifest.n_tokens

    def verify(self) -> None:
        """Check every shard's checksum, dtype and shape; raise naming the first bad shard."""
        for shard in self.manifest.shards:
            open_shard(self.directory, shard, self.spec)

    def shard(self, i: int) -> Tensor:
        """Shard ``i`` as a ``[rows, d_in]`` tensor backed by the memory map (read-only)."""
        if self._arrays[i] is None:
            self._arrays[i] = open_shard(self.directory, self.manifest.shards[i], self.spec)
        with warnings.catch_warnings():  # torch warns on read-only memory; these are only read
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(self._arrays[i])
        return tensor.view(torch.bfloat16) if self.spec.dtype == "bfloat16" else tensor

    def __getitem__(self, index: int | slice) -> Tensor:
        rows = range(len(self))[index]
        if isinstance(rows, int):
            return self[rows : rows + 1][0]
        if rows.step != 1:
            raise ValueError("only contiguous slices of an activation cache are supported")
        parts = []
        for i in range(len(self.manifest.shards)):
            lo, hi = max(rows.start, self._starts[i]), min(rows.stop, self._starts[i + 1])
            if lo < hi:
                parts.append(self.shard(i)[lo - self._starts[i] : hi - self._starts[i]])
        return torch.cat(parts) if parts else torch.empty(0, self.d_in, dtype=self.spec.torch_dtype)

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self.manifest.shards)):
            yield self.shard(i)


class CacheWriter:
    """Append shards to a cache folder, resuming an incomplete one with the same spec."""

    def __init__(self, directory: str | Path, spec: CacheSpec) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / MANIFEST).is_file():
            self.manifest = Manifest.read(self.directory)
            check_spec(self.manifest.spec, spec, self.directory)
            for shard in self.manifest.shards:  # never append to a cache that is already damaged
                open_shard(self.directory, shard, self.manifest.spec)
            for stray in self.directory.glob(".shard_*.tmp"):  # left by a crash mid-write
                stray.unlink()
        else:
            self.manifest = Manifest(spec)
            self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(self.manifest.to_dict(), self.directory / MANIFEST)

    def append(self, rows: Tensor, contexts: int) -> None:
        """Write ``rows [n, d_in]`` (harvested from ``contexts`` contexts) as the next shard."""
        spec = self.manifest.spec
        if rows.dim() != 2 or rows.shape[1] != spec.d_in:
            raise ValueError(f"rows must be [n, d_in={spec.d_in}], got {tuple(rows.shape)}")
        array = _to_numpy(rows.to(spec.torch_dtype))
        path = self.directory / f"shard_{len(self.manifest.shards):05d}.npy"

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, array)

        atomic_write(path, write)
        self.manifest.shards.append({"file": path.name, "rows": int(rows.shape[0]), "contexts": int(contexts), "sha256": sha256_file(path)})
        self._write_manifest()

    def finish(self) -> None:
        self.manifest.complete = True
        self._write_manifest()


def build_cache(
    model: Any,
    token_batches: Iterable[Tensor],
    directory: str | Path,
    spec: CacheSpec,
    *,
    n_tokens: int | None = None,
    shard_tokens: int = 1 << 16,
    progress: bool = True,
) -> ActivationCache:
    """Harvest ``spec.hook_name`` over ``token_batches`` into ``directory`` and open the result.

    ``token_batches`` must be the same deterministic stream on every call (e.g. from
    ``text.load_tokens`` / ``iter_contexts``): on resume the contexts already stored are
    skipped. Stops after ``n_tokens`` activation rows (whole contexts; all of the stream if
    None) in shards of about ``shard_tokens`` rows.
    """
    check_int("shard_tokens", shard_tokens)
    writer = CacheWriter(directory, spec)
    if writer.manifest.complete:
        return ActivationCache(directory, expect=spec)
    to_skip = writer.manifest.n_contexts
    done = writer.manifest.n_tokens

    def remaining() -> Iterator[Tensor]:
        skip = to_skip
        for tokens in token_batches:
            if skip >= tokens.shape[0]:
                skip -= tokens.shape[0]
                continue
            yield tokens[skip:]
            skip = 0

    pending: list[Tensor] = []
    pending_contexts = 0
    total = None if n_tokens is None else max(n_tokens - done, 0)
    if n_tokens is None or done < n_tokens:
        acts = iter_activations(model, remaining(), spec.hook_name, drop_first=spec.drop_first, total_tokens=total, progress=progress)
        for tokens, batch in acts:
            pending.append(batch[spec.hook_name])  # [batch * tokens_per_context, d_in]
            pending_contexts += tokens.shape[0]
            done += pending[-1].shape[0]
            if sum(p.shape[0] for p in pending) >= shard_tokens:
                writer.append(torch.cat(pending), pending_contexts)
                pending, pending_contexts = [], 0
            if n_tokens is not None and done >= n_tokens:
                break
    if pending:
        writer.append(torch.cat(pending), pending_contexts)
    writer.finish()
    return ActivationCache(directory, expect=spec)
