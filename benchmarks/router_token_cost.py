"""Router CPU per decode step at batch 64, early and late in long answers: the scheduler's own token handling
(text, stop sequences, events, metrics) over SmolLM2's tokenizer, with no model and no gRPC in the way.

The work per token must not grow with the output (incremental detokenization, stop sequences matched over the
new tail): the figure is the step cost at output length 1,024 ÷ at 64 (goal ≤ 1.2). For contrast it also times
what the router did before (decoding each request's whole output every step).

Run: ``.venv/bin/python benchmarks/router_token_cost.py [--batch 64] [--short 64] [--long 1024]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router.inflight import InFlightRequest
from loraplex.router.metrics import Metrics
from loraplex.router.scheduler import Scheduler
from loraplex.router.settings import RouterSettings
from loraplex.router.tokenizer import TextTokenizer
from loraplex.router.validation import validate_parameters
from loraplex.shard.embedded import embedded_model_dir

TEXT = (
    "The mountain village woke slowly. Smoke rose from the chimneys, the baker opened his shutters, and a dog "
    "barked at the milk cart — « bonjour », said the driver, naïvely hoping for coffee. Über den Bergen lag "
    "Nebel; 山の上には霧がかかっていた. Numbers: 3.14159, 2,718, 1e-9. Lists: apples; pears; plums. "
)


def _scheduler(tokenizer: TextTokenizer, batch: int) -> tuple[Scheduler, list[InFlightRequest]]:
    settings = RouterSettings(max_input_tokens=8, max_total_tokens=4096, max_batch_total_tokens=1 << 20)
    scheduler = Scheduler(None, tokenizer, settings, set(), Metrics())  # type: ignore[arg-type]
    params = validate_parameters({"max_new_tokens": 4000, "stop": ["\n\nUser:", "###", "</answer>"]}, settings)
    requests = []
    for i in range(batch):
        e = InFlightRequest([1, 2, 3], params, 4000)
        e.id = i + 1
        scheduler.running[e.id] = e
        requests.append(e)
    return scheduler, requests


def _step_cpu(tokenizer: TextTokenizer, batch: int, length: int, steps: int, stream: list[int]) -> float:
    """CPU seconds of one step's token handling for ``batch`` requests that have ``length`` tokens already."""
    scheduler, requests = _scheduler(tokenizer, batch)

    def step(n: int) -> None:
        tokens = [stream[(n + 7 * e.id) % len(stream)] for e in requests]
        gens = [pb.Generation(request_id=e.id, token=pb.Token(id=t)) for e, t in zip(requests, tokens, strict=True)]
        scheduler._handle(gens)

    for n in range(length):
        step(n)
    start = time.process_time()
    for n in range(length, length + steps):
        step(n)
    cost = (time.process_time() - start) / steps
    assert all(not e.finished for e in requests), "a stop sequence ended a request: the measure is off"
    return cost


def _whole_decode_cpu(tokenizer: TextTokenizer, batch: int, length: int, steps: int, stream: list[int]) -> float:
    """What every step did before: decode each request's whole output and scan its text for stops."""
    outputs = [[stream[(n + i * 7) % len(stream)] for n in range(length)] for i in range(batch)]
    start = time.process_time()
    for _ in range(steps):
        for ids in outputs:
            text = tokenizer.decode(ids)
            any(s in text for s in ("\n\nUser:", "###", "</answer>"))
    return (time.process_time() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = TextTokenizer(embedded_model_dir())
    stream = tokenizer.encode(TEXT * 40)
    _step_cpu(tokenizer, args.batch, 8, args.steps, stream)  # warm-up: first-use costs land in no figure
    shorts, longs = [], []
    for _ in range(args.rounds):  # interleaved, the best of each kept: noise only ever adds time
        shorts.append(_step_cpu(tokenizer, args.batch, args.short, args.steps, stream))
        longs.append(_step_cpu(tokenizer, args.batch, args.long, args.steps, stream))
    short, long = min(shorts), min(longs)
    old_short = _whole_decode_cpu(tokenizer, args.batch, args.short, args.steps, stream)
    old_long = _whole_decode_cpu(tokenizer, args.batch, args.long, args.steps, stream)
    result = {
        "batch": args.batch,
        "step_ms_at_short": round(short * 1e3, 3),
        "step_ms_at_long": round(long * 1e3, 3),
        "long_over_short": round(long / short, 3),
        "whole_decode_ms_at_short": round(old_short * 1e3, 3),
        "whole_decode_ms_at_long": round(old_long * 1e3, 3),
        "whole_decode_long_over_short": round(old_long / old_short, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
