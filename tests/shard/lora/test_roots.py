"""Adapter roots: ids resolve inside a root or not at all, symlinks included."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.roots import AdapterRoots
from tests.factories import tiny_model, write_raw_adapter


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model"
    tiny_model(model, "llama")
    first, second, outside = tmp_path / "first", tmp_path / "second", tmp_path / "outside"
    write_raw_adapter(first / "team" / "one", model, rank=2)
    write_raw_adapter(second / "two", model, rank=2)
    write_raw_adapter(outside / "secret", model, rank=2)
    (first / "escape").symlink_to(outside / "secret", target_is_directory=True)
    write_raw_adapter(second / "inner-target", model, rank=2)
    (second / "alias").symlink_to(second / "inner-target", target_is_directory=True)
    return dict(first=first, second=second, outside=outside)


def test_ids_resolve_in_root_order_and_symlinks_inside_a_root_are_fine(layout: dict[str, Path]) -> None:
    roots = AdapterRoots([layout["first"], layout["second"]])
    assert roots.find("team/one") == (layout["first"] / "team" / "one").resolve()
    assert roots.find("two") == (layout["second"] / "two").resolve()
    assert roots.find("alias") == (layout["second"] / "inner-target").resolve()
    assert sorted(roots.discover()) == ["inner-target", "team/one", "two"]  # symlinks are not walked


@pytest.mark.parametrize("adapter_id", ["escape", "../outside/secret", "team/../../outside/secret", "nothing", "team"])
def test_anything_outside_or_missing_is_not_found_with_one_message(layout: dict[str, Path], adapter_id: str) -> None:
    roots = AdapterRoots([layout["first"], layout["second"]])
    with pytest.raises(AdapterError) as info:
        roots.find(adapter_id)
    assert info.value.kind == "not_found" and str(info.value) == f"adapter {adapter_id!r} not found"


def test_a_weight_file_linked_out_of_the_root_is_refused(layout: dict[str, Path]) -> None:
    inner = layout["first"] / "sneaky"
    inner.mkdir()
    (inner / "adapter_config.json").write_text((layout["outside"] / "secret" / "adapter_config.json").read_text())
    (inner / "adapter_model.safetensors").symlink_to(layout["outside"] / "secret" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="not found"):
        AdapterRoots([layout["first"]]).find("sneaky")


def test_a_root_that_is_not_a_directory_is_a_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="is not a directory"):
        AdapterRoots.parse(f"{tmp_path},{tmp_path / 'missing'}")


def test_hub_ids_resolve_in_the_cache_only_when_enabled(tmp_path: Path) -> None:
    """``hf-cache`` in --adapter-dirs: "owner/name" ids come from the huggingface_hub cache, never downloaded."""
    import subprocess
    import sys

    tiny_model(tmp_path / "model", "llama")
    snapshot = tmp_path / "hub" / "models--acme--pirate-lora" / "snapshots" / ("b" * 40)
    write_raw_adapter(snapshot, tmp_path / "model", rank=2)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("b" * 40)
    code = (
        "import sys; from loraplex.shard.lora.roots import AdapterRoots\n"
        "roots = AdapterRoots.parse(sys.argv[1])\n"
        "for i in sys.argv[2:]:\n"
        "    try: print(roots.find(i))\n"
        "    except Exception as e: print(type(e).__name__, e)\n"
    )
    # No HF_HUB_OFFLINE: the lookup itself must not go to the network (this machine could not anyway).
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin"}
    ids = ["acme/pirate-lora", "acme/absent", "../hub"]
    on = subprocess.run([sys.executable, "-c", code, "hf-cache", *ids], capture_output=True, text=True, env=env)
    assert on.returncode == 0, on.stderr
    assert on.stdout.splitlines() == [
        str(snapshot.resolve()),
        "AdapterError adapter 'acme/absent' not found",
        "AdapterError adapter '../hub' not found",
    ]
    off = subprocess.run([sys.executable, "-c", code, str(tmp_path), ids[0]], capture_output=True, text=True, env=env)
    assert off.stdout.strip() == "AdapterError adapter 'acme/pirate-lora' not found"
