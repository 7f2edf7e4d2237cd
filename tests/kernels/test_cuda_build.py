"""The CUDA sources build for every supported architecture without spills; without a GPU nothing else runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from loraplex.kernels import cuda

ARCHS = ["sm_80", "sm_89", "sm_90"]
INSTANCES = 8  # shrink and expand x float16/bfloat16 x 1- and 8-token tiles


def _nvcc() -> str:
    found = shutil.which("nvcc") or next(
        (str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc")) if p.exists()), None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is required in CI to check the CUDA kernels")
        pytest.skip("nvcc is not installed here (CI requires it)")
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(arch: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [_nvcc(), "-cubin", f"-arch={arch}", "-std=c++17", "-DLORAPLEX_INSTANTIATE", "-Xptxas", "-v",
         "-o", str(tmp_path / "lora.cubin"), str(cuda.SOURCE)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = proc.stdout + proc.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == INSTANCES, report
    assert all(stores == "0" and loads == "0" for stores, loads in spills), report
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert len(registers) == INSTANCES and max(registers) <= 255


def test_without_a_gpu_the_launcher_says_so_and_refuses_cpu_tensors() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/kernels/test_cuda_kernels.py covers it")
    from loraplex.kernels.segments import Segments, SegmentWeights

    assert not cuda.available()
    segs = Segments.build([[0, 1]], [4])
    a = SegmentWeights.of([torch.zeros(1, 4, 8, dtype=torch.bfloat16)])
    with pytest.raises(cuda.KernelError, match="CUDA"):
        cuda.shrink(torch.zeros(2, 8, dtype=torch.bfloat16), segs, a, 0)
    with pytest.raises(cuda.KernelError, match="ranks must be"):
        cuda.shrink(torch.zeros(2, 8, dtype=torch.bfloat16), Segments.build([[0]], [129]), a, 0)
