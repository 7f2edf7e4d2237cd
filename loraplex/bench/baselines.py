"""Baselines on the same requests: transformers ``generate``, peft with ``set_adapter``, peft ``adapter_names``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from loraplex.bench.clients import RequestResult
from loraplex.bench.workload import BenchRequest

BASELINES = ("transformers", "peft-sequential", "peft-mixed")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class _StepClock:
    """A logits processor that only notes when each generation step happens (one token per row)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def load_model(model_dir: Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.eval()


def _chunks(items: Sequence[BenchRequest], size: int) -> Iterator[Sequence[BenchRequest]]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + max(size, 1)]


@torch.inference_mode()
def _generate(
    model: Any, batch: Sequence[BenchRequest], pad_id: int, **kwargs: Any
) -> tuple[list[list[int]], list[float]]:
    """Greedy, exactly ``max_new_tokens`` per row (EOS cannot end a row early): token counts, step times."""
    from transformers import LogitsProcessorList

    width = max(len(r.prompt.ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):  # left padding, as decoder-only generation wants
        ids[row, width - len(r.prompt.ids) :] = torch.tensor(r.prompt.ids)
        mask[row, width - len(r.prompt.ids) :] = 1
    new = max(r.max_new_tokens for r in batch)
    clock = _StepClock()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([clock]),
        **kwargs,
    )
    return out[:, width:].tolist(), clock.times


def _record(
    batch: Sequence[BenchRequest], sent: float, tokens: list[list[int]], times: list[float]
) -> list[RequestResult]:
    done = time.perf_counter()
    return [
        RequestResult(r.index, r.adapter, sent, times[: len(t)], list(t), done=done, finish_reason="length")
        for r, t in zip(batch, tokens, strict=True)
    ]


def _pad_id(model: Any) -> int:
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    return int(pad or 0)


def run_transformers(
    model: Any, requests: Sequence[BenchRequest], batch_size: int
) -> tuple[list[RequestResult], float, float]:
    """Static batches of ``batch_size`` through plain ``generate``; adapters are ignored (base only)."""
    pad = _pad_id(model)
    _generate(model, requests[:1], pad)  # warm-up
    results: list[RequestResult] = []
    started = time.perf_counter()
    for batch in _chunks(requests, batch_size):
        tokens, times = _generate(model, batch, pad)
        results += _record(batch, started, tokens, times)
    return results, started, time.perf_counter()


def peft_names(adapters: Sequence[str | None]) -> dict[str, str]:
    """peft module names for adapter ids (ids may hold ``/`` and ``.``, which module names may not)."""
    distinct = sorted({a for a in adapters if a is not None})
    return {a: f"adapter_{i}" for i, a in enumerate(distinct)}


def wrap_peft(model: Any, adapter_root: Path, names: dict[str, str]) -> Any:
    """``model`` with every named adapter loaded through peft (in place)."""
    from peft import PeftModel

    if not names:
        return model
    items = list(names.items())
    first_id, first_name = items[0]
    peft_model = PeftModel.from_pretrained(model, str(adapter_root / first_id), adapter_name=first_name)
    for adapter_id, name in items[1:]:
        peft_model.load_adapter(str(adapter_root / adapter_id), adapter_name=name)
    return peft_model.eval()


def _adapter_off(model: Any, adapter: str | None) -> AbstractContextManager[Any]:
    return model.disable_adapter() if adapter is None and hasattr(model, "disable_adapter") else nullcontext()


def run_peft_sequential(
    model: Any, names: dict[str, str], requests: Sequence[BenchRequest]
) -> tuple[list[RequestResult], float, float]:
    """One request at a time, switching adapters with ``set_adapter`` (the base through ``disable_adapter``)."""
    pad = _pad_id(model)
    _generate(model, requests[:1], pad)
    results: list[RequestResult] = []
    started = time.perf_counter()
    for r in requests:
        if r.adapter is not None:
            model.set_adapter(names[r.adapter])
        with _adapter_off(model, r.adapter):
            tokens, times = _generate(model, [r], pad)
        results += _record([r], started, tokens, times)
    return results, started, time.perf_counter()


def run_peft_mixed(
    model: Any, names: dict[str, str], requests: Sequence[BenchRequest], batch_size: int
) -> tuple[list[RequestResult], float, float]:
    """Static mixed-adapter batches: ``generate(..., adapter_names=[one per row])``."""
    pad = _pad_id(model)

    def adapter_names(batch: Sequence[BenchRequest]) -> dict[str, Any]:
        if not names:
            return {}
        return {"adapter_names": [names[r.adapter] if r.adapter is not None else BASE for r in batch]}

    _generate(model, requests[:1], pad, **adapter_names(requests[:1]))
    results: list[RequestResult] = []
    started = time.perf_counter()
    for batch in _chunks(requests, batch_size):
        tokens, times = _generate(model, batch, pad, **adapter_names(batch))
        results += _record(batch, started, tokens, times)
    return results, started, time.perf_counter()
