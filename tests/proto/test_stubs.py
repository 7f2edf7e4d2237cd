"""The gRPC stubs in the tree are exactly what proto/ generates now: stale stubs fail here."""

from __future__ import annotations

from pathlib import Path

from loraplex.protogen import ROOT, generate, generated_files


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    current = generated_files(ROOT)
    assert len(fresh) == len(current) == 6
    for new, old in zip(fresh, current, strict=True):
        assert old.is_file(), f"{old} is missing: run make install"
        assert new.read_bytes() == old.read_bytes(), f"{old.relative_to(ROOT)} is stale: run make install"
