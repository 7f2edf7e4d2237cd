"""The shard's allocator policy: a large activation freed and allocated again costs no fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
import torch
from shard.allocator import keep_freed_memory, release_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "policy" else None
def faults_of_one_activation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB: past glibc's largest default mmap threshold
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# posix_memalign asks for a little more than the block it freed, so the heap grows a few times until freed
# neighbours coalesce: 8-11 rounds here, depending on the heap's layout (the clone's path, the environment)
faults = [faults_of_one_activation() for _ in range(32)]
print(applied, max(faults[-8:]), min(faults[-8:]))
release_freed_memory()
"""


def _faults(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    applied, most, least = out.stdout.split()
    return applied, int(most), int(least)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_activations_are_reused_instead_of_faulted_in_again() -> None:
    _, _, default_least = _faults("default")
    applied, policy_most, _ = _faults("policy")
    assert applied == "True"
    assert default_least > 10_000  # 64 MiB = 16,384 pages, zeroed by the kernel every time
    assert policy_most < 100
