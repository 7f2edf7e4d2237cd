"""Compile ``lora_sgmv.cu`` through NVRTC as CuPy does, without a GPU: the CI check of the run-time build.

CuPy refuses to compile without a driver, so this calls libnvrtc directly (the pip package
``nvidia-cuda-nvrtc``; headers from ``nvidia-cuda-runtime``) with CuPy's inputs: the same source, the same
name expressions, ``kernels.cuda.OPTIONS`` plus the ``-arch`` CuPy adds, and ptxas's report for spills.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from loraplex.kernels import cuda


class NvrtcMissing(RuntimeError):
    """libnvrtc or the CUDA headers are not installed (``pip install nvidia-cuda-nvrtc nvidia-cuda-runtime``)."""


@dataclass(frozen=True)
class Build:
    log: str
    cubin: bytes
    lowered: dict[str, str]  # name expression -> mangled name


def _nvidia_dirs() -> list[Path]:
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels
    except ImportError as exc:
        raise NvrtcMissing("no nvidia-* pip package is installed") from exc
    return [Path(p) for p in nvidia.__path__]


def _library() -> ctypes.CDLL:
    found = [f for d in _nvidia_dirs() for f in glob.glob(str(d / "*" / "lib" / "libnvrtc.so*"))]
    found += [f for d in _nvidia_dirs() for f in glob.glob(str(d / "cuda_nvrtc" / "lib" / "libnvrtc.so*"))]
    if not found:
        raise NvrtcMissing("libnvrtc not found: pip install nvidia-cuda-nvrtc")
    return ctypes.CDLL(sorted(found)[0])


def include_dir() -> Path:
    for d in _nvidia_dirs():
        for header in glob.glob(str(d / "**" / "include" / "cuda_bf16.h"), recursive=True):
            return Path(header).parent
    raise NvrtcMissing("cuda_bf16.h not found: pip install nvidia-cuda-runtime")


def compile_kernels(arch: str) -> Build:
    """Compile every name expression for ``arch`` (e.g. ``sm_90``); raises RuntimeError with the log on failure."""
    lib = _library()
    prog = ctypes.c_void_p()
    source = cuda.SOURCE.read_bytes()
    _ok(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"lora_sgmv.cu", 0, None, None))
    try:
        names = list(cuda.NAMES)
        for name in names:
            _ok(lib, lib.nvrtcAddNameExpression(prog, name.encode()))
        options = [*cuda.OPTIONS, f"-arch={arch}", f"-I{include_dir()}", "-Xptxas", "-v"]
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        log = (
            _read_bytes(lib, prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog")
            .rstrip(b"\0")
            .decode(errors="replace")
        )
        if status != 0:
            raise RuntimeError(f"NVRTC failed for {arch} ({_error(lib, status)}):\n{log}")
        cubin = _read_bytes(lib, prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            _ok(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)))
            lowered[name] = (out.value or b"").decode()
        return Build(log, cubin, lowered)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _read_bytes(lib: ctypes.CDLL, prog: ctypes.c_void_p, size_fn: str, get_fn: str) -> bytes:
    size = ctypes.c_size_t()
    _ok(lib, getattr(lib, size_fn)(prog, ctypes.byref(size)))
    buf = ctypes.create_string_buffer(size.value)
    _ok(lib, getattr(lib, get_fn)(prog, buf))
    return buf.raw


def _error(lib: ctypes.CDLL, status: int) -> str:
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return (lib.nvrtcGetErrorString(status) or b"?").decode()


def _ok(lib: ctypes.CDLL, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"NVRTC: {_error(lib, status)}")


if __name__ == "__main__":  # python -m loraplex.kernels.nvrtc: the report, per architecture
    for target in os.environ.get("ARCHS", "sm_80 sm_90").split():
        print(target, compile_kernels(target).log)
