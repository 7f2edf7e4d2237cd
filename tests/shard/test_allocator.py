"""The shard's allocator policy: a large activation freed and allocated again costs no fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import ctypes, resource, sys
import torch
from loraplex.shard.allocator import keep_freed_memory, release_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "policy" else None
def faults_of_one_activation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB: past glibc's largest default mmap threshold
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def faults_of_lora_stacks():
    # A decode plan's stacks: five 256 MiB blocks, freed together (1.25 GiB at the heap's top). malloc
    # directly, so that nothing else lands between them and the top.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(256 << 20) for _ in range(5)]
    for b in blocks:
        libc.memset(b, 1, 256 << 20)
    for b in reversed(blocks):
        libc.free(b)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# posix_memalign asks for a little more than the block it freed, so the heap grows a few times until freed
# neighbours coalesce: 8-11 rounds here, depending on the heap's layout (the clone's path, the environment)
probe = faults_of_one_activation if sys.argv[2] == "activation" else faults_of_lora_stacks
rounds = 32 if sys.argv[2] == "activation" else 4
faults = [probe() for _ in range(rounds)]
print(applied, max(faults[rounds // 2 :]), min(faults[rounds // 2 :]))
release_freed_memory()
"""


def _faults(mode: str, probe: str = "activation") -> tuple[str, int, int]:
    command = [sys.executable, "-c", _PROBE, mode, probe]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    applied, most, least = out.stdout.split()
    return applied, int(most), int(least)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_activations_are_reused_instead_of_faulted_in_again() -> None:
    _, _, default_least = _faults("default")
    applied, policy_most, _ = _faults("policy")
    assert applied == "True"
    assert default_least > 10_000  # 64 MiB = 16,384 pages, zeroed by the kernel every time
    assert policy_most < 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_over_a_gibibyte_freed_at_once_is_not_trimmed_away() -> None:
    # A decode plan's LoRA stacks for 64 large adapters: with a 1 GiB trim threshold they went back to the
    # OS when freed, and every later plan faulted them in again (262,112 faults a round here).
    applied, policy_most, _ = _faults("policy", "stacks")
    assert applied == "True"
    assert policy_most < 100  # 1.25 GiB is 327,680 pages
