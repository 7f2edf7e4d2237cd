"""Hostile adapter files: backtracking patterns, lying headers, one-layer files, byte budgets, slow loads."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import loraplex.shard.lora.patterns as patterns_module
import loraplex.shard.lora.weights_file as weights_file_module
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import inspect_adapter, load_adapter
from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.patterns import MAX_PATTERN_CHARS, match_names
from loraplex.shard.lora.roots import AdapterRoots
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.projections import PROJECTIONS
from tests.factories import tiny_model, write_raw_adapter

CATASTROPHIC = "(.|.)*X"  # 2^n ways to fail on an n-character module name: minutes for "model.layers.0..."


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelConfig]:
    base = tmp_path_factory.mktemp("hostile") / "base"
    tiny_model(base, "llama")
    return base, ModelConfig.from_dir(base)


def _edit(directory: Path, **changes: Any) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def _store(config: ModelConfig, root: Path, **kwargs: Any) -> AdapterStore:
    return AdapterStore(config, dtype=torch.float32, roots=AdapterRoots([root]), **kwargs)


@pytest.mark.parametrize(
    "changes",
    [
        {"rank_pattern": {"q_proj": 2, CATASTROPHIC: 4}},
        {"alpha_pattern": {CATASTROPHIC: 4.0}},
        {"target_modules": CATASTROPHIC},
    ],
    ids=["rank_pattern", "alpha_pattern", "target_modules"],
)
def test_a_backtracking_pattern_is_refused_within_seconds(
    model: tuple[Path, ModelConfig], tmp_path: Path, changes: dict[str, Any]
) -> None:
    base, config = model
    _edit(write_raw_adapter(tmp_path / "root" / "evil", base, rank=2), **changes)
    write_raw_adapter(tmp_path / "root" / "good", base, rank=2)
    store = _store(config, tmp_path / "root")
    started = time.monotonic()
    with pytest.raises(AdapterError, match="backtracking") as info:
        store.load("evil")
    assert info.value.kind == "pattern_timeout"
    assert time.monotonic() - started < 10
    assert "evil" not in store and store.load("good") is not None  # the store is not held by it


def test_patterns_too_long_or_too_many_are_refused_before_matching(
    model: tuple[Path, ModelConfig], tmp_path: Path
) -> None:
    base, _ = model
    d = write_raw_adapter(tmp_path / "a", base, rank=2)
    config = ModelConfig.from_dir(base)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank_pattern": {"q" * (MAX_PATTERN_CHARS + 1): 2}}, "characters"),
        ({"alpha_pattern": {f"k{i}": 1.0 for i in range(5000)}}, "keys"),
        ({"target_modules": "a" * 1000}, "characters"),
    ]
    for changes, words in cases:
        _edit(d, rank_pattern={}, alpha_pattern={}, target_modules=["q_proj", "v_proj"])
        _edit(d, **changes)
        with pytest.raises(AdapterError, match=words) as info:
            load_adapter("a", d, config, max_rank=16, dtype=torch.float32)
        assert info.value.kind == "unsafe_pattern"


def test_an_invalid_regular_expression_is_a_config_error(model: tuple[Path, ModelConfig], tmp_path: Path) -> None:
    base, config = model
    d = _edit(write_raw_adapter(tmp_path / "a", base, rank=2), rank_pattern={"q_proj(": 4})
    with pytest.raises(AdapterError, match="rank_pattern is not a valid regular expression") as info:
        load_adapter("a", d, config, max_rank=16, dtype=torch.float32)
    assert info.value.kind == "bad_config"


def test_plain_and_child_matching_agree_with_pythons_re_as_peft_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    names = [f"model.layers.{i}.{p.module}.{p.name}" for i in (0, 1, 12) for p in PROJECTIONS.values()]
    names += ["lm_head", "model.norm"]
    keys = ["q_proj", "layers.1.self_attn.q_proj", "1.mlp.up_proj", "q.proj", "self_attn", "model.layers.12.mlp"]
    target = "model.layers.1.self_attn.v_proj"
    plain = match_names(names, target, keys, keys[::-1])
    monkeypatch.setattr(patterns_module, "_PLAIN", re.compile(r"(?!)"))  # every pattern goes to the child
    child = match_names(names, target, keys, keys[::-1])
    assert plain == child
    expect_rank = [next((i for i, k in enumerate(keys) if re.match(rf"(.*\.)?({k})$", n)), -1) for n in names]
    assert plain.rank == expect_rank and plain.target == [bool(re.fullmatch(target, n)) for n in names]
    regex = r".*\.(k_proj|up_proj)"
    found = match_names(names, regex, [r"layers\.1[0-9]?\..*"], [])
    assert found.target == [bool(re.fullmatch(regex, n)) for n in names]


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None], keep_data: int | None = None) -> None:
    """Rewrite a safetensors file's JSON header (and cut its data to ``keep_data`` bytes)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[: len(data) if keep_data is None else keep_data])


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real = weights_file_module.safe_open

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(weights_file_module, "safe_open", counting)
    return reads


def test_a_shape_declared_wrong_in_the_header_is_refused_without_reading_tensors(
    model: tuple[Path, ModelConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, config = model
    d = write_raw_adapter(tmp_path / "a", base, rank=4)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def claim_huge(header: dict[str, Any]) -> None:
        # A lying header: a huge matrix where the data is tiny. Reading it would fail or allocate 4 GB.
        header[key]["shape"] = [4, 1 << 28]

    _rewrite_header(d / "adapter_model.safetensors", claim_huge, keep_data=16)
    reads = _count_reads(monkeypatch)
    with pytest.raises(AdapterError) as info:
        load_adapter("a", d, config, max_rank=16, dtype=torch.float32)
    assert info.value.kind == "corrupt" and "declares" in str(info.value)  # offsets disagree with the shape
    assert reads == []

    d2 = write_raw_adapter(tmp_path / "b", base, rank=4)

    def wrong_features(header: dict[str, Any]) -> None:  # consistent offsets, but not this model's shape
        begin, _ = header[key]["data_offsets"]
        header[key]["shape"] = [2, 8]
        header[key]["data_offsets"] = [begin, begin + 2 * 8 * 4]

    _rewrite_header(d2 / "adapter_model.safetensors", wrong_features, keep_data=64)  # tensor data truncated too
    with pytest.raises(AdapterError, match="do not fit") as info:
        load_adapter("b", d2, config, max_rank=16, dtype=torch.float32)
    assert info.value.kind == "shape_mismatch"
    assert reads == []


def test_truncated_data_behind_a_valid_header_is_refused_without_reading(
    model: tuple[Path, ModelConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, config = model
    d = write_raw_adapter(tmp_path / "a", base, rank=4)
    _rewrite_header(d / "adapter_model.safetensors", lambda h: None, keep_data=100)
    reads = _count_reads(monkeypatch)
    with pytest.raises(AdapterError, match="corrupt or truncated") as info:
        load_adapter("a", d, config, max_rank=16, dtype=torch.float32)
    assert info.value.kind == "corrupt" and reads == []


def test_only_the_targeted_tensors_are_read(model: tuple[Path, ModelConfig], tmp_path: Path) -> None:
    """PEFT creates modules only where target_modules and layers_to_transform say, and reads nothing else."""
    base, config = model
    d = write_raw_adapter(tmp_path / "a", base, rank=4, targets=("q_proj", "v_proj", "down_proj"))
    _edit(d, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    loaded = load_adapter("a", d, config, max_rank=16, dtype=torch.float32)
    assert set(loaded.projections) == {"q_proj", "v_proj"}
    assert {p.ranks.keys() == {1} for p in loaded.projections.values()} == {True}
    # rank 4, float32, layer 1 only: the k/down tensors and layer 0's were never counted (nor read)
    assert loaded.weight_bytes == 4 * 4 * sum(sum(PROJECTIONS[p].shape(config)) for p in ("q_proj", "v_proj"))
    # PEFT refuses layers_to_transform with a regular-expression target; so do we.
    _edit(d, target_modules=r".*\.q_proj")
    with pytest.raises(AdapterError, match="layers_to_transform cannot be used") as info:
        load_adapter("a", d, config, max_rank=16, dtype=torch.float32)
    assert info.value.kind == "bad_config"


def test_a_one_layer_file_is_accounted_at_what_it_allocates(model: tuple[Path, ModelConfig], tmp_path: Path) -> None:
    """The kernels index adapter weights by layer, so untouched layers are stored as zeros: a one-layer file
    takes (and is accounted, budgeted and listed at) every layer's bytes, never just its file size."""
    base, config = model
    d = write_raw_adapter(tmp_path / "root" / "one", base, rank=4, targets=("q_proj",))
    _edit(d, layers_to_transform=[0])
    store = _store(config, tmp_path / "root")
    plan = inspect_adapter("one", d, config, max_rank=16, dtype=torch.float32)
    loaded = store.load("one")
    in_f, out_f = PROJECTIONS["q_proj"].shape(config)
    assert plan.weight_bytes == 4 * (in_f + out_f) * 4  # one layer read from the file
    assert plan.memory_bytes == loaded.memory_bytes == config.num_layers * 4 * (in_f + out_f) * 4
    assert store.record("one").bytes == loaded.memory_bytes and store.used_bytes() == (loaded.memory_bytes, 0)


def test_a_cuda_shard_keeps_only_the_trained_layers_in_host_memory(
    model: tuple[Path, ModelConfig], tmp_path: Path
) -> None:
    """On CUDA the host copy is never used by a plan: it holds the trained layers only, and the device copy
    (``to``) is laid out in full, equal to what a CPU shard holds. No GPU needed: only ``to`` touches it."""
    base, config = model
    d = write_raw_adapter(tmp_path / "root" / "one", base, rank=4, targets=("q_proj", "v_proj"))
    _edit(d, layers_to_transform=[1])
    full = _store(config, tmp_path / "root").load("one")
    cuda = _store(config, tmp_path / "root", device="cuda", max_host_bytes=full.memory_bytes // 2)
    compact = cuda.load("one")  # fits a host budget of half the full layout: it takes 1 of 2 layers
    assert compact.memory_bytes * config.num_layers == full.memory_bytes == compact.device_bytes
    rec = cuda.record("one")
    assert (rec.host_bytes, rec.bytes) == (compact.memory_bytes, full.memory_bytes)
    assert cuda.used_bytes() == (compact.memory_bytes, 0)
    laid_out = compact.to("cpu")
    for name, weights in full.projections.items():
        assert torch.equal(laid_out.projections[name].a, weights.a)
        assert torch.equal(laid_out.projections[name].b, weights.b)


def _adapters(base: Path, root: Path, n: int) -> int:
    for i in range(n):
        write_raw_adapter(root / f"a{i}", base, rank=4, seed=i)
    config = ModelConfig.from_dir(base)
    return inspect_adapter("a0", root / "a0", config, max_rank=16, dtype=torch.float32).memory_bytes


def test_the_host_byte_budget_refuses_past_it_and_an_adapter_bigger_than_it_for_good(
    model: tuple[Path, ModelConfig], tmp_path: Path
) -> None:
    base, config = model
    size = _adapters(base, tmp_path / "root", 4)
    store = _store(config, tmp_path / "root", max_host_bytes=int(2.5 * size))
    store.load("a0")
    store.load("a1")
    with pytest.raises(AdapterError, match="--max-cpu-adapter-bytes") as info:
        store.load("a2")
    assert info.value.kind == "capacity" and store.ids() == ["a0", "a1"]
    with pytest.raises(AdapterError) as missing:
        store.load("does-not-exist")  # existence first: a missing id is not_found even when the store is full
    assert missing.value.kind == "not_found"
    store.unload("a0")
    store.load("a2")
    assert store.used_bytes()[0] == 2 * size
    small = _store(config, tmp_path / "root", max_host_bytes=size - 1)
    with pytest.raises(AdapterError, match="more than the shard's --max-cpu-adapter-bytes") as big:
        small.load("a3")
    assert big.value.kind == "too_large"


def test_the_device_byte_budget_demotes_the_least_recently_used_unpinned_adapters(
    model: tuple[Path, ModelConfig], tmp_path: Path
) -> None:
    base, config = model
    size = _adapters(base, tmp_path / "root", 4)
    store = _store(config, tmp_path / "root", max_active=8, max_device_bytes=2 * size)
    for name in ("a0", "a1", "a2"):
        store.load(name)
    store.acquire(["a0"], pinned=set())
    store.acquire(["a1"], pinned=set())
    assert store.used_bytes() == (3 * size, 2 * size)
    store.acquire(["a2"], pinned={"a0"})  # a0 is older but in use: a1 goes
    tiers = {r.adapter_id: r.tier for r in store.records(discover=False)}
    assert tiers == {"a0": "device", "a1": "host", "a2": "device"}
    with pytest.raises(AdapterError, match="--max-device-adapter-bytes") as info:
        store.acquire(["a1"], pinned={"a0", "a2"})
    assert info.value.kind == "capacity"
    with pytest.raises(AdapterError) as big:
        _store(config, tmp_path / "root", max_device_bytes=size // 2).load("a3")
    assert big.value.kind == "too_large"


def test_a_load_past_its_deadline_fails_alone_and_keeps_nothing(
    model: tuple[Path, ModelConfig], tmp_path: Path
) -> None:
    base, config = model
    _adapters(base, tmp_path / "root", 2)

    def slow(piece: Callable[[], Any]) -> Any:  # a model thread busy with long steps, or a slow disk
        time.sleep(0.4)
        return piece()

    store = _store(config, tmp_path / "root", load_timeout=0.3, pace=slow)
    started = time.monotonic()
    with pytest.raises(AdapterError, match="--adapter-load-timeout") as info:
        store.load("a0")
    assert info.value.kind == "load_timeout" and time.monotonic() - started < 5
    assert store.ids() == [] and store.used_bytes() == (0, 0)
    store.pace, store.load_timeout = None, 60.0
    assert store.load("a1") is not None
