"""The code reads the way pyproject.toml's ruff settings say (lint and format), checked with every test run."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_lint_and_format_are_clean():
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is missing: pip install -e '.[test]'"
    for command in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
