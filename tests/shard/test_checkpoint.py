"""Checkpoints: unsupported architectures, pickle-only weights and missing models fail with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex.shard.checkpoint import CheckpointError, resolve_model_dir, safetensors_files
from loraplex.shard.config import ModelConfig, ModelConfigError
from loraplex.shard.runner import build_runner
from tests.factories import tiny_model


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelConfigError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2"):
        ModelConfig.from_dir(tmp_path)


def test_unsupported_rope_scaling_is_refused() -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_scaling": {"rope_type": "longrope"},
    }
    with pytest.raises(ModelConfigError, match="longrope"):
        ModelConfig.from_dict(raw)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    tiny_model(tmp_path, "llama")
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        safetensors_files(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        build_runner(tmp_path)


def test_missing_local_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "absent"))


def test_generate_cli_bad_model_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from loraplex.shard.generate import main; raise SystemExit(main())",
            "hi",
            "--model-id",
            str(tmp_path / "absent"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_hub_id_resolves_from_the_offline_cache(tmp_path: Path) -> None:
    """A hub id is looked up in the huggingface_hub cache; HF_HUB_OFFLINE=1 means no network is tried."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    tiny_model(snapshot, "llama")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    code = "from loraplex.shard.checkpoint import resolve_model_dir; print(resolve_model_dir('acme/tiny-llama'))"
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == snapshot
    missing = code.replace("acme/tiny-llama", "acme/absent")
    proc = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "neither a local directory nor reachable" in proc.stderr


def test_sliding_window_read_as_transformers_reads_it() -> None:
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}
    base |= {"vocab_size": 100}
    mistral = {**base, "architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_dict(mistral).sliding_window == 4096  # MistralConfig's default when the key is absent
    assert ModelConfig.from_dict({**mistral, "sliding_window": None}).sliding_window is None
    assert ModelConfig.from_dict({**mistral, "sliding_window": 32}).sliding_window == 32
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32}
    assert ModelConfig.from_dict(qwen).sliding_window is None  # use_sliding_window defaults to false
    assert ModelConfig.from_dict({**qwen, "use_sliding_window": True, "max_window_layers": 4}).sliding_window is None
    with pytest.raises(ModelConfigError, match="some layers only"):
        ModelConfig.from_dict({**qwen, "use_sliding_window": True, "max_window_layers": 2})
