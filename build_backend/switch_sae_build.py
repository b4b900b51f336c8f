"""PEP 517 build backend: scikit-build-core, compiled against the torch it will run with.

A compiled torch extension loads only under the torch it was compiled against, and pip
builds in an isolated environment that would otherwise get a torch of its own (the newest
one the index offers). This wrapper asks the interpreter that runs pip, which is the one
the package is being installed for, which torch it imports:

* It has one: torch is left out of the build requirements, and CMake probes that very
  torch (its site folder goes first on the probe's ``sys.path``), so the extension is
  compiled against the user's own torch, whatever its version, build (CPU or CUDA) or
  origin, with no second copy downloaded or unpacked.
* It has none (a fresh environment, or ``python -m build``): torch is a build requirement
  like the others, and the torch pip puts in the build environment is the one used; the
  install then resolves the same ``torch`` requirement to the same release.

Either way the wheel's metadata then requires exactly that torch (``torch==<version>``):
the binary runs with no other, so pip installs that torch beside it in a fresh
environment, and reports a later change of torch as a conflict.

Everything else is scikit-build-core's, unchanged.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from scikit_build_core import build as _skbuild
from scikit_build_core.build import build_sdist, get_requires_for_build_sdist  # noqa: F401

if sys.version_info >= (3, 11):
    import tomllib
else:  # scikit-build-core itself depends on tomli before 3.11
    import tomli as tomllib

SOURCE_DIR = Path(__file__).resolve().parent.parent

# Run by the target interpreter without PYTHONPATH or PYTHONNOUSERSITE (-E), which is how
# pip hides the target's packages from the build: it sees what `import torch` will see at
# run time. find_spec locates the package without importing it (importing a CUDA torch
# takes seconds).
_FIND_TORCH = """
import importlib.metadata, importlib.util, json, pathlib
spec = importlib.util.find_spec("torch")
if spec is None or spec.origin is None:
    print("null")
else:
    site = pathlib.Path(spec.origin).parent.parent
    # The metadata beside the package, unless torch is a source checkout (pip install -e).
    beside = next(iter(importlib.metadata.distributions(name="torch", path=[str(site)])), None)
    version = beside.version if beside else importlib.metadata.version("torch")
    print(json.dumps({"site": str(site), "version": version}))
"""


def installed_torch() -> dict | None:
    """``{"site", "version"}`` of the torch the installing interpreter imports, or None."""
    return _torch_of(sys.executable)


@functools.cache  # each build hook runs in its own process: one interpreter start per hook
def _torch_of(python: str) -> dict | None:
    done = subprocess.run([python, "-E", "-c", _FIND_TORCH], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def build_torch_version() -> str | None:
    """Version of the torch the extension is compiled against (see the module docstring)."""
    torch = installed_torch()
    if torch is not None:
        return torch["version"]
    try:  # the torch pip installed in the build environment
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_torch_requirement(requirement: str) -> bool:
    return Requirement(requirement).name == "torch"


def torch_requirement() -> str:
    """The ``torch`` entry of the project's dependencies (one place states the range)."""
    with open(SOURCE_DIR / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return next(d for d in dependencies if is_torch_requirement(d))


def pin_torch(metadata: str, version: str) -> str:
    """Core metadata text with its ``Requires-Dist: torch...`` line replaced by ``torch==version``."""
    prefix = "Requires-Dist: "
    return "".join(
        f"{prefix}torch=={version}\n"
        if line.startswith(prefix) and is_torch_requirement(line[len(prefix):].strip())
        else line
        for line in metadata.splitlines(keepends=True)
    )


def _pin_torch_in_wheel(wheel_path: Path, version: str) -> None:
    """Rewrite the wheel with a pinned METADATA, and that file's new hash in RECORD."""
    with zipfile.ZipFile(wheel_path) as old:
        dist_info = next(n.split("/")[0] for n in old.namelist() if n.endswith(".dist-info/METADATA"))
        metadata_name, record_name = f"{dist_info}/METADATA", f"{dist_info}/RECORD"
        metadata = pin_torch(old.read(metadata_name).decode(), version).encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(metadata).digest()).rstrip(b"=").decode()
        record = "".join(
            f"{metadata_name},sha256={digest},{len(metadata)}\n" if line.startswith(f"{metadata_name},") else line
            for line in old.read(record_name).decode().splitlines(keepends=True)
        )
        replaced = {metadata_name: metadata, record_name: record.encode()}
        pinned = wheel_path.with_name(wheel_path.name + ".pinned")
        with zipfile.ZipFile(pinned, "w") as new:
            for item in old.infolist():  # each keeps its own compression
                new.writestr(item, replaced.get(item.filename) or old.read(item))
    os.replace(pinned, wheel_path)


def _with_torch(config_settings: dict | None) -> dict:
    """Point CMake at the installed torch and give each (interpreter, torch) its build folder.

    The folder keeps rebuilds incremental; one per interpreter and torch keeps a CMake cache
    that holds another torch's library paths from ever being reused. Without an installed
    torch (it lives in a throw-away build environment) scikit-build-core's temporary build
    folder is used.
    """
    settings = dict(config_settings or {})
    torch = installed_torch()
    if torch is None:
        return settings
    settings.setdefault("cmake.define.SWITCH_SAE_TORCH_SITE", torch["site"])
    if "build-dir" not in settings and "SKBUILD_BUILD_DIR" not in os.environ:
        key = hashlib.sha256(f"{sys.executable}\0{torch['site']}".encode()).hexdigest()[:10]
        settings["build-dir"] = f"build/{{wheel_tag}}-torch{torch['version']}-{key}"
    return settings


def _requires(requires: list[str]) -> list[str]:
    return requires + ([] if installed_torch() else [torch_requirement()])


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_skbuild.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings=None):
    return _requires(_skbuild.get_requires_for_build_editable(config_settings))


def _build(build, wheel_directory, config_settings):
    name = build(wheel_directory, _with_torch(config_settings))
    version = build_torch_version()
    if version is not None:
        _pin_torch_in_wheel(Path(wheel_directory, name), version)
    return name


# No prepare_metadata_* hooks: scikit-build-core would reject prepared metadata that the pin
# made differ from its own, so frontends read the metadata from the built (pinned) wheel.
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(_skbuild.build_wheel, wheel_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(_skbuild.build_editable, wheel_directory, config_settings)
