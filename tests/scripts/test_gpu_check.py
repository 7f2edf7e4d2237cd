"""``scripts/gpu_check.sh --dry-run`` on this machine: its prerequisites report, its parsing of the sample output
and its exit codes, without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip


def test_the_dry_run_checks_itself_and_succeeds(tmp_path: Path) -> None:
    proc = _run("--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "dry run: all checks behave" in out and "FAIL -" not in out
    assert out.count("dry run: ok") == 6
    assert "    missing: " in out and "    python " in out  # the prerequisites report, shown


def test_without_a_gpu_the_real_run_says_what_is_missing_and_fails(tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run is the check there")
    proc = _run(tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "missing: " in proc.stdout and "a CUDA GPU visible to torch" in proc.stdout
    assert "cannot run the GPU checks here" in proc.stderr
