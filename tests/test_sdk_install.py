"""The SDK installs and imports alone, without any of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from .conftest import ROOT


def test_sdk_installs_without_server_dependencies(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT / "sdk_python")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import importlib.util, cuepoint; "
        "missing = [m for m in ('aiosqlite', 'structlog', 'yaml', 'pydantic', 'cuepoint_server') "
        "if importlib.util.find_spec(m)]; "
        "print(sorted(cuepoint.__all__)[:3], missing)"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "['AssignedEngagement', 'AssociateClient', 'AssociateConfig'] []", out.stdout
    assert sys.version_info >= (3, 11)
