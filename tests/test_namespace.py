"""One import namespace: a user's own `common.py`, `builder.py`, `blocks.py`, `trainer.py` or `cli.py` beside
their script (or first on PYTHONPATH) never shadows the tool, through the CLI or the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SPECS

SHADOWS = ("common", "builder", "blocks", "trainer", "cli")


@pytest.fixture
def shadowed(tmp_path: Path) -> Path:
    for name in SHADOWS:
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the user\\'s own {name}.py was imported')\n")
    return tmp_path


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "200"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_script_beside_the_users_own_modules_uses_the_tool(shadowed):
    script = shadowed / "train_my_model.py"
    script.write_text(
        "import torch\n"
        "import blockgraph\n"
        "from blockgraph import build, load_spec\n"
        f"spec = load_spec({str(SPECS / 'tiny_encoder.yaml')!r})\n"
        f"model = build({str(SPECS / 'tiny_encoder.yaml')!r}, overrides={{'layers': 1}})\n"
        "print(type(spec).__name__, tuple(model(torch.zeros(2, 5, dtype=torch.long)).shape))\n"
    )
    done = _run([sys.executable, str(script)], shadowed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ValidSpec", "(2,", "5,", "1000)"]


@pytest.mark.parametrize("command", [["validate"], ["build", "--set", "layers=1"]])
def test_the_cli_from_a_folder_of_the_users_own_modules(shadowed, command):
    console_script = Path(sys.executable).parent / "blockgraph"
    done = _run([str(console_script), command[0], str(SPECS / "tiny_encoder.yaml"), *command[1:]], shadowed)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "own" not in done.stderr


def test_python_dash_m_from_a_folder_of_the_users_own_modules(shadowed):
    done = _run([sys.executable, "-m", "blockgraph.cli", "blocks", "list", "attention"], shadowed)
    assert done.returncode == 0, done.stderr
    assert "multi_head_attention" in done.stdout
