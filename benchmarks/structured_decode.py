"""Decode step on SmolLM2 at batch 64 with every sequence under a JSON Schema or regex grammar, against the same
step unconstrained, side by side (steps interleaved): forward, masks and token choice all counted. Goal <= 1.10.

Run: ``.venv/bin/python benchmarks/structured_decode.py [--batch 64] [--steps 30] [--threads N] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.shard.embedded import embedded_model_dir
from loraplex.shard.grammar import GrammarCompiler
from loraplex.shard.runner import ModelRunner, SequenceState, build_runner
from loraplex.shard.sampling import SamplingParams, TokenChooser, choose_tokens

_STR = {"type": "string", "maxLength": 16}
# What extraction adapters are asked for: objects with enums, bounded numbers, arrays, optional fields, anyOf.
GRAMMARS: list[tuple[str, str]] = [
    (
        "json",
        json.dumps(
            {
                "type": "object",
                "properties": {
                    "name": _STR,
                    "age": {"type": "integer", "minimum": 0, "maximum": 130},
                    "tags": {"type": "array", "items": _STR, "maxItems": 4},
                    "status": {"enum": ["active", "inactive", "banned"]},
                    "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
                },
                "required": ["name", "age", "status"],
                "additionalProperties": False,
            }
        ),
    ),
    (
        "json",
        json.dumps(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"label": {"enum": ["pos", "neg", "neutral"]}, "span": _STR},
                    "required": ["label", "span"],
                    "additionalProperties": False,
                },
                "maxItems": 5,
            }
        ),
    ),
    ("regex", r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"),
    ("json", json.dumps({"type": "object"})),  # json_object: any object
]


def make_batch(runner: ModelRunner, batch: int, prompt_len: int, seed: int) -> list[SequenceState]:
    gen = torch.Generator().manual_seed(seed)
    vocab = runner.model.config.vocab_size
    seqs = [SequenceState(i, torch.randint(vocab, (prompt_len,), generator=gen).tolist(), None) for i in range(batch)]
    for s, t in zip(seqs, runner.prefill(seqs).argmax(-1).tolist(), strict=True):
        s.token_ids.append(t)
    return seqs


class TokenChooserFactory:
    """Row ``i``'s sampler: greedy, under grammar ``i`` (round robin) when a compiler is given."""

    def __init__(self, eos: list[int], grammars: GrammarCompiler | None) -> None:
        self.eos, self.grammars = eos, grammars

    def __call__(self, i: int) -> TokenChooser:
        if self.grammars is None:
            return TokenChooser(SamplingParams(), eos_ids=self.eos)
        kind, grammar = GRAMMARS[i % len(GRAMMARS)]
        params = SamplingParams(grammar_type=kind, grammar=grammar)
        return TokenChooser(params, eos_ids=self.eos, grammars=self.grammars)


def step(
    runner: ModelRunner, seqs: list[SequenceState], picks: list[TokenChooser], fresh: TokenChooserFactory
) -> tuple[float, float]:
    """One decode step (forward, then every row's choice); (step seconds, of which choosing)."""
    start = time.perf_counter()
    logits = runner.decode(seqs)
    chosen = time.perf_counter()
    choices = choose_tokens(logits, picks, [s.token_ids for s in seqs])
    end = time.perf_counter()
    for i, (s, c) in enumerate(zip(seqs, choices, strict=True)):
        s.token_ids.append(c.token_id)
        if c.token_id in picks[i].eos_ids:  # a finished answer: the row starts another, the batch stays full
            picks[i] = fresh(i)
    return end - start, end - chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = embedded_model_dir()
    per_seq = args.prompt_len + args.steps + 8
    runner = build_runner(model_dir, kv_blocks=2 * args.batch * (per_seq // 16 + 2), block_size=16)
    config = runner.model.config
    eos = list(config.eos_token_ids)
    start = time.perf_counter()
    grammars = GrammarCompiler.from_dir(model_dir, config.vocab_size, eos)
    setup_s = time.perf_counter() - start
    cases = {
        "unconstrained": TokenChooserFactory(eos, None),
        "constrained": TokenChooserFactory(eos, grammars),
    }
    start = time.perf_counter()
    picks = {name: [fresh(i) for i in range(args.batch)] for name, fresh in cases.items()}
    compile_s = time.perf_counter() - start
    batches = {name: make_batch(runner, args.batch, args.prompt_len, seed=7) for name in cases}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for i in range(args.steps + 3):
        # Interleaved, in alternating order, so that machine noise and whatever the first of a pair pays hit both
        # alike.
        for name in list(cases)[:: 1 if i % 2 else -1]:
            t = step(runner, batches[name], picks[name], cases[name])
            if i >= 3:  # the first steps warm the lexers' caches
                times[name].append(t)
    rows = {
        name: {
            "step_ms": statistics.median(t for t, _ in ts) * 1e3,
            "choose_ms": statistics.median(c for _, c in ts) * 1e3,
        }
        for name, ts in times.items()
    }
    ratio = rows["constrained"]["step_ms"] / rows["unconstrained"]["step_ms"]
    # The forward is the same work in both cases; on a busy machine its noise swamps the ratio, so the ratio with
    # only the choosing time swapped is printed too.
    extra = rows["constrained"]["choose_ms"] - rows["unconstrained"]["choose_ms"]
    choice_ratio = 1 + extra / rows["unconstrained"]["step_ms"]
    print(
        f"SmolLM2-135M float32 CPU, batch {args.batch}, {args.threads} torch threads, median of {args.steps} "
        f"interleaved steps; llguidance tokenizer setup {setup_s * 1e3:.0f} ms, "
        f"{len(GRAMMARS)} grammars compiled (x{args.batch // len(GRAMMARS)} copies) in {compile_s * 1e3:.0f} ms"
    )
    for name, r in rows.items():
        print(f"{name:<15} step {r['step_ms']:8.1f} ms   of which token choice {r['choose_ms']:6.2f} ms")
    print(f"constrained / unconstrained = {ratio:.3f} (goal <= 1.10); from the choosing times alone {choice_ratio:.3f}")
    if args.json:
        out = {"rows": rows, "ratio": ratio, "choice_ratio": choice_ratio, "batch": args.batch}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
