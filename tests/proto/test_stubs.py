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


def test_public_and_internal_adapter_info_share_their_wire_format() -> None:
    """The router forwards the shards' AdapterInfo by re-parsing its bytes: fields must keep their numbers."""
    from loraplex.proto.shard.v1 import shard_pb2
    from loraplex.proto.v1 import generate_pb2

    public = {f.name: (f.number, f.type) for f in generate_pb2.AdapterInfo.DESCRIPTOR.fields}
    internal = {f.name: (f.number, f.type) for f in shard_pb2.AdapterInfo.DESCRIPTOR.fields}
    assert public == internal
    sample = shard_pb2.AdapterInfo(id="a/b", rank=8, targets=["q_proj"], bytes=10, tier="host", requests=3)
    assert generate_pb2.AdapterInfo.FromString(sample.SerializeToString()).targets == ["q_proj"]
