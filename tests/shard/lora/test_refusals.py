"""Every adapter loraplex cannot serve is refused with its own error, and the store keeps serving."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import build_runner
from tests.factories import make_adapter, tiny_model


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("refusals")
    base = tiny_model(root / "base", "llama")
    good = make_adapter(base, root / "good", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    runner = build_runner(root / "base", kv_blocks=64, block_size=8)
    return dict(root=root, base=base, good=good, runner=runner)


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _copy_good(env: dict[str, Any], tmp: Path) -> Path:
    out = tmp / "adapter"
    shutil.copytree(env["good"], out)
    return out


def _pickle_only(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    return d


def _dora(env: dict[str, Any], tmp: Path) -> Path:
    return make_adapter(env["base"], tmp / "dora", r=4, target_modules=["q_proj"], use_dora=True)


def _modules_to_save(env: dict[str, Any], tmp: Path) -> Path:
    return make_adapter(env["base"], tmp / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])


def _bias(env: dict[str, Any], tmp: Path) -> Path:
    return make_adapter(env["base"], tmp / "bias", r=4, target_modules=["q_proj"], bias="lora_only")


def _missing_target(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    _edit_config(d, target_modules=["q_proj", "fc1"])
    return d


def _lm_head_target(env: dict[str, Any], tmp: Path) -> Path:
    return make_adapter(env["base"], tmp / "head", r=4, target_modules=["lm_head"])


def _wrong_shape(env: dict[str, Any], tmp: Path) -> Path:
    other = tiny_model(tmp / "other", "llama", hidden_size=32, intermediate_size=64)
    return make_adapter(other, tmp / "other_adapter", r=4, target_modules=["q_proj"])


def _over_rank(env: dict[str, Any], tmp: Path) -> Path:
    return make_adapter(env["base"], tmp / "big", r=32, target_modules=["q_proj"])


def _rank_disagrees_with_config(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    _edit_config(d, r=4)
    return d


def _corrupt(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    (d / "adapter_model.safetensors").write_bytes(b"\x07" * 300)
    return d


def _truncated(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _bad_json(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    (d / "adapter_config.json").write_text("{not json")
    return d


def _half_pair(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    first_b = next(k for k in tensors if "lora_B" in k)
    del tensors[first_b]
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _alora(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    _edit_config(d, alora_invocation_tokens=[5, 9])
    return d


def _unknown_tensor(env: dict[str, Any], tmp: Path) -> Path:
    d = _copy_good(env, tmp)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _missing_dir(env: dict[str, Any], tmp: Path) -> Path:
    return tmp / "nowhere"


CASES: list[tuple[Callable[[dict[str, Any], Path], Path], str, str]] = [
    (_pickle_only, "pickle_weights", "pickle"),
    (_dora, "dora", "DoRA"),
    (_modules_to_save, "modules_to_save", "modules_to_save"),
    (_bias, "bias", "bias"),
    (_missing_target, "unsupported_target", "fc1"),
    (_lm_head_target, "unsupported_target", "lm_head"),
    (_wrong_shape, "shape_mismatch", "do not fit"),
    (_over_rank, "rank_too_large", "above the limit of 16"),
    (_rank_disagrees_with_config, "shape_mismatch", "rank 4"),
    (_corrupt, "corrupt", "corrupt or truncated"),
    (_truncated, "corrupt", "corrupt or truncated"),
    (_bad_json, "corrupt", "not valid JSON"),
    (_half_pair, "corrupt", "not its other half"),
    (_alora, "unsupported_config", "alora_invocation_tokens"),
    (_unknown_tensor, "unsupported_target", "lora_embedding_A is not the lora_A/lora_B matrix"),
    (_missing_dir, "not_found", "does not exist"),
]


@pytest.mark.parametrize(("make", "kind", "words"), CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_refused_with_specific_error_and_store_keeps_serving(
    env: dict[str, Any], tmp_path: Path, make: Callable[[dict[str, Any], Path], Path], kind: str, words: str
) -> None:
    runner = env["runner"]
    store = AdapterStore(runner.model.config, dtype=torch.float32, max_rank=16)
    store.load("good", env["good"])
    store.load("victim", env["good"])
    prompt = [5, 9, 2, 33]
    before = runner.generate_greedy([(prompt, store.get("good"))], 6)

    bad = make(env, tmp_path)
    with pytest.raises(AdapterError, match=words) as info:
        store.load("victim", bad)  # a failed reload must not replace what is loaded
    assert info.value.kind == kind
    with pytest.raises(AdapterError):
        store.load("newcomer", bad)

    assert store.ids() == ["good", "victim"]
    assert runner.generate_greedy([(prompt, store.get("good"))], 6) == before
    assert runner.generate_greedy([(prompt, store.get("victim"))], 6) == before


def test_unload_and_unknown_ids(env: dict[str, Any]) -> None:
    store = AdapterStore(env["runner"].model.config, dtype=torch.float32)
    store.load("good", env["good"])
    store.unload("good")
    assert "good" not in store
    with pytest.raises(AdapterError, match="not loaded") as info:
        store.get("good")
    assert info.value.kind == "not_found"
    with pytest.raises(AdapterError, match="not loaded"):
        store.unload("good")


def test_empty_layers_to_transform_means_every_layer(env: dict[str, Any], tmp_path: Path) -> None:
    runner = env["runner"]
    store = AdapterStore(runner.model.config, dtype=torch.float32)
    listed = _copy_good(env, tmp_path)
    _edit_config(listed, layers_to_transform=[])  # PEFT reads an empty list as "no restriction"
    prompt = [5, 9, 2, 33]
    good = runner.generate_greedy([(prompt, store.load("good", env["good"]))], 6)
    assert runner.generate_greedy([(prompt, store.load("listed", listed))], 6) == good
    assert runner.generate_greedy([(prompt, None)], 6) != good  # the adapter does change the output
