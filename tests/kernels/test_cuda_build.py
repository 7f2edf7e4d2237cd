"""The CUDA sources build for every supported architecture without spills, through nvcc and through NVRTC as CuPy
compiles them at run time (the pip packages nvidia-cuda-nvrtc and nvidia-cuda-runtime, dev dependencies)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from loraplex.kernels import cuda, nvrtc

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
        [_nvcc(), "-cubin", f"-arch={arch}", *cuda.OPTIONS, "-DLORAPLEX_INSTANTIATE", "-Xptxas", "-v",
         "-o", str(tmp_path / "lora.cubin"), str(cuda.SOURCE)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _no_spills(proc.stdout + proc.stderr)


def _no_spills(report: str) -> None:
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == INSTANCES, report
    assert all(stores == "0" and loads == "0" for stores, loads in spills), report
    stacks = re.findall(r"(\d+) bytes stack frame", report)
    assert stacks and all(s == "0" for s in stacks), report  # no local-memory arrays either
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert len(registers) == INSTANCES and max(registers) <= 255


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_through_nvrtc_as_cupy_does(arch: str) -> None:
    build = nvrtc.compile_kernels(arch)  # the shard's options (kernels.cuda.OPTIONS) plus CuPy's -arch
    _no_spills(build.log)
    assert set(build.lowered) == set(cuda.NAMES) and all(build.lowered.values())
    assert build.cubin[:4] == b"\x7fELF"  # machine code for the architecture, not PTX left to the driver


def test_without_a_gpu_the_launcher_says_so_and_refuses_cpu_tensors() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/kernels/test_cuda_kernels.py covers it")
    from loraplex.kernels import ops
    from loraplex.kernels.segments import Segments, SegmentWeights

    assert not cuda.available()
    segs = Segments.build([[0, 1]], [4])
    a = SegmentWeights.of([torch.zeros(1, 4, 8, dtype=torch.bfloat16)])
    args = (list(a.stacks), a.pointers, 0, segs.rows, segs.indptr, segs.ranks)
    with pytest.raises(cuda.KernelError, match="CUDA"):
        ops.sgmv_shrink_cuda(torch.zeros(2, 8, dtype=torch.bfloat16), *args, segs.max_rank, segs.longest)
    with pytest.raises(cuda.KernelError, match="CUDA"):
        ops.sgmv_expand_cuda(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 4), *args, segs.longest)
