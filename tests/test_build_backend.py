"""The in-tree build backend's own logic (build_backend/switch_sae_build.py), without a build.

The end-to-end behaviour, ``pip install <checkout>`` in new venvs, is tests/test_install.py.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))
switch_sae_build = pytest.importorskip("switch_sae_build", reason="needs scikit-build-core (a build tool)")

METADATA = """Metadata-Version: 2.2
Name: switch_sae
Version: 0.1.0
Requires-Dist: torch>=2.6
Requires-Dist: torchvision>=0.20; extra == "vision"
Requires-Dist: numpy>=1.24

Long description mentioning Requires-Dist: torch>=2.6 in prose.
"""


def test_pin_torch_replaces_only_the_torch_requirement():
    pinned = switch_sae_build.pin_torch(METADATA, "2.13.0+cpu")
    lines = pinned.splitlines()
    assert "Requires-Dist: torch==2.13.0+cpu" in lines
    assert "Requires-Dist: torch>=2.6" not in lines
    assert 'Requires-Dist: torchvision>=0.20; extra == "vision"' in lines
    assert "Requires-Dist: numpy>=1.24" in lines
    assert lines[-1] == "Long description mentioning Requires-Dist: torch>=2.6 in prose."
    assert len(lines) == len(METADATA.splitlines())


def test_torch_requirement_comes_from_the_project_dependencies():
    assert switch_sae_build.torch_requirement().replace(" ", "").startswith("torch>=")


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def test_pinned_wheel_keeps_a_valid_record(tmp_path):
    wheel = tmp_path / "switch_sae-0.1.0-cp311-cp311-linux_x86_64.whl"
    files = {"switch_sae/__init__.py": b"x = 1\n", "switch_sae-0.1.0.dist-info/METADATA": METADATA.encode()}
    record = "".join(record_line(name, data) for name, data in files.items()) + "switch_sae-0.1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in files.items():
            out.writestr(name, data)
        out.writestr("switch_sae-0.1.0.dist-info/RECORD", record)
    switch_sae_build._pin_torch_in_wheel(wheel, "2.14.1")
    with zipfile.ZipFile(wheel) as pinned:
        contents = {name: pinned.read(name) for name in pinned.namelist()}
        assert all(item.compress_type == zipfile.ZIP_DEFLATED for item in pinned.infolist())
    metadata = contents["switch_sae-0.1.0.dist-info/METADATA"]
    assert b"Requires-Dist: torch==2.14.1\n" in metadata
    assert contents["switch_sae/__init__.py"] == b"x = 1\n"
    assert contents["switch_sae-0.1.0.dist-info/RECORD"].decode() == (
        record_line("switch_sae/__init__.py", b"x = 1\n")
        + record_line("switch_sae-0.1.0.dist-info/METADATA", metadata)
        + "switch_sae-0.1.0.dist-info/RECORD,,\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]  # no scratch left behind


def test_installed_torch_is_what_the_installing_interpreter_imports(tmp_path, monkeypatch):
    # This interpreter has torch; a new venv has none.
    import torch

    found = switch_sae_build.installed_torch()
    assert found is not None and found["version"] == torch.__version__
    assert Path(torch.__file__).parent.parent == Path(found["site"])
    empty = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(empty)
    monkeypatch.setattr(sys, "executable", str(empty / "bin" / "python"))
    assert switch_sae_build.installed_torch() is None
    assert subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0
