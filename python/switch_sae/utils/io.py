"""Files switch_sae writes and reads back: atomic writes, checksums, and reads that name the file.

Every file a user could lose work over (weights, configs, checkpoints, cache manifests)
is written through ``atomic_write``: a temporary file in the same folder, flushed to
disk, then renamed over the target (atomic on POSIX), so a crash leaves the old file or
the new one, never half. Reading goes through ``read_json`` / ``read_safetensors``, which
turn a truncated, damaged or missing file into a ``DamagedFileError`` that names it (the
underlying parsers do not), and ``check_sha256`` refuses a file whose bytes changed.

What it leaves out: what the files mean (models, checkpoints, activation cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor


class DamagedFileError(ValueError):
    """A saved file is missing, truncated, corrupt, or disagrees with what refers to it."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def atomic_write_safetensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (files may be larger than RAM)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: Any, listed_in: str | Path) -> None:
    """Raise ``DamagedFileError`` unless ``path`` exists and hashes to ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing (it is listed in {listed_in})")
    if not isinstance(expected, str) or sha256_file(path) != expected:
        raise DamagedFileError(f"{path} is corrupt: its SHA-256 does not match the one recorded in {listed_in}")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{path} is not valid JSON (truncated or damaged?): {err}") from err


def read_json_object(path: str | Path) -> dict[str, Any]:
    """``read_json`` for files that must hold a JSON object (configs, manifests)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on the CPU) and its metadata; a damaged file raises naming it."""
    return _read_safetensors(path, tensors=True)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (its header only); a damaged file raises naming it."""
    return _read_safetensors(path, tensors=False)[1]


def _read_safetensors(path: str | Path, tensors: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return ({name: f.get_tensor(name) for name in f.keys()} if tensors else {}), metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise DamagedFileError(f"{path} is not a valid safetensors file (truncated or damaged?): {err}") from err


def check_tensors(found: dict[str, Tensor], expected: dict[str, Tensor], path: str | Path) -> None:
    """Raise naming ``path`` unless ``found`` has exactly ``expected``'s names, shapes, dtypes."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise DamagedFileError(f"{path} does not match the config: missing {missing}, unexpected {unexpected}")
    for name, want in expected.items():
        got = found[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise DamagedFileError(
                f"{path}: {name} is {got.dtype} {tuple(got.shape)} but the config implies "
                f"{want.dtype} {tuple(want.shape)}"
            )

