"""LoRA plan build + apply per step through a chunked-prefill ramp-up on the CPU: the old plan against the pooled one.

Run: ``.venv/bin/python benchmarks/plan_build.py [--repeats 2] [--prompt-min 128 --prompt-max 128] [--old-ref REV]``

Replays what the runner's ``_lora`` sees when 64 requests arrive at once, each with its own rank-16 adapter on
all seven projections of a SmolLM2-135M-shaped model (bfloat16 weights; decode's stacks in float32): every
step holds the decode rows of the requests whose prompt is done plus up to ``--budget`` prompt tokens in
chunks, until every prompt is in; then ``--decode-steps`` decode-only steps (the steady state, which must
not get slower). Each step builds the step's plan and applies it at every site of every layer, on random
activations. "old" is ``shard/lora/torch_plan.py`` as of ``--old-ref`` driven as the runner drove it then
(a new plan per mixed step in prefill's dtype; decode's plan cached by its rows' adapters); "new" is this
tree's ``ModelRunner._lora``. Variants alternate in one process, and the best pass of each is reported;
then both final decode plans alternate step by step for ``--steady-steps``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplex.shard.config import ModelConfig  # noqa: E402
from loraplex.shard.kv_cache import KVCache  # noqa: E402
from loraplex.shard.lora.adapter import LoraAdapter, ProjectionWeights  # noqa: E402
from loraplex.shard.lora.plan import LoraPlan  # noqa: E402
from loraplex.shard.model import CausalLM  # noqa: E402
from loraplex.shard.projections import PROJECTIONS, SITES  # noqa: E402
from loraplex.shard.runner import ModelRunner  # noqa: E402

# The plan as committed before adapters' stacks were pooled across plans.
DEFAULT_OLD_REF = "c22cb47"

SMOLLM2_135M = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)

Step = list[int]  # each row's request (its adapter's index)
Builder = Callable[[list[LoraAdapter | None], bool], LoraPlan | None]


def make_adapters(config: ModelConfig, count: int, rank: int, dtype: torch.dtype) -> list[LoraAdapter]:
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(count):
        projections = {}
        for name, proj in PROJECTIONS.items():
            n_in, n_out = proj.shape(config)
            a = (torch.randn(config.num_layers, n_in, rank, generator=gen) * 0.02).to(dtype)
            b = (torch.randn(config.num_layers, rank, n_out, generator=gen) * 0.02).to(dtype)
            projections[name] = ProjectionWeights(a, b, dict.fromkeys(range(config.num_layers), rank))
        adapters.append(LoraAdapter(f"heavy-{i}", projections, 0))
    return adapters


def schedule(requests: int, budget: int, prompt_range: tuple[int, int], decode_steps: int, seed: int) -> list[Step]:
    """Rows of each step: a decode row per request whose prompt is done, then prompt chunks up to ``budget``
    tokens, requests in arrival order (as the router's scheduler admits a burst)."""
    rnd = random.Random(seed)
    left = [rnd.randint(*prompt_range) for _ in range(requests)]
    decoding: list[int] = []
    steps = []
    while any(left):
        rows = list(decoding)
        room = budget
        finished = []
        for r, n in enumerate(left):
            if n and room:
                take = min(n, room)
                rows += [r] * take
                left[r] -= take
                room -= take
                if not left[r]:
                    finished.append(r)
        decoding += finished
        steps.append(rows)
    steps += [list(decoding)] * decode_steps
    return steps


def old_plan_module(ref: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{ref}:shard/lora/torch_plan.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader("_old_torch_plan", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{ref}:shard/lora/torch_plan.py", "exec"), module.__dict__)
    return module


def old_builder(config: ModelConfig, module: ModuleType) -> Builder:
    """The runner's ``_lora`` as it was: decode's plan cached by its rows' adapters, every other step a new plan."""
    cached: dict[str, Any] = {"key": None, "plan": None}

    def build(rows: list[LoraAdapter | None], decode: bool) -> LoraPlan | None:
        key = tuple(a.serial if a is not None else 0 for a in rows)
        if decode and key == cached["key"]:
            return cast(LoraPlan, cached["plan"])
        if decode:
            cached["key"] = cached["plan"] = None
        plan = module.TorchLoraPlan(rows, config, torch.float32 if decode else None)
        if decode:
            cached["key"], cached["plan"] = key, plan
        return cast(LoraPlan, plan)

    return build


def new_builder(config: ModelConfig) -> tuple[Builder, ModelRunner]:
    model = SimpleNamespace(config=config, device=torch.device("cpu"))
    runner = ModelRunner(cast(CausalLM, model), cast(KVCache, None), decode_lora_dtype=torch.float32)
    return runner._lora, runner


def apply_all(plan: LoraPlan, xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor], layers: int) -> None:
    for layer in range(layers):
        for site in SITES:
            plan.apply(site, layer, xs[site], ys[site])


def activations(
    rows: int, config: ModelConfig, dtype: torch.dtype, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    xs, ys = {}, {}
    for site, projs in SITES.items():
        xs[site] = torch.randn(rows, projs[0].shape(config)[0], generator=gen).to(dtype)
        ys[site] = torch.zeros(rows, sum(p.shape(config)[1] for p in projs), dtype=dtype)
    return xs, ys


def run_pass(
    build: Builder, steps: list[Step], adapters: list[LoraAdapter], config: ModelConfig, dtype: torch.dtype
) -> tuple[list[tuple[float, float]], LoraPlan]:
    """(build seconds, apply seconds) of each step, and the last step's plan."""
    gen = torch.Generator().manual_seed(1)
    times = []
    plan = None
    for step_rows in steps:
        rows: list[LoraAdapter | None] = [adapters[r] for r in step_rows]
        decode = len(step_rows) == len(set(step_rows))
        xs, ys = activations(len(rows), config, dtype, gen)
        start = time.perf_counter()
        plan = build(rows, decode)
        built = time.perf_counter()
        assert plan is not None
        apply_all(plan, xs, ys, config.num_layers)
        times.append((built - start, time.perf_counter() - built))
    assert plan is not None
    return times, plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=int, default=256, help="prompt tokens a step")
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steady-steps", type=int, default=10, help="alternating decode steps at the end")
    parser.add_argument("--old-ref", default=DEFAULT_OLD_REF)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, dtype = SMOLLM2_135M, torch.bfloat16
    adapters = make_adapters(config, args.requests, args.rank, dtype)
    steps = schedule(args.requests, args.budget, (args.prompt_min, args.prompt_max), args.decode_steps, seed=2)
    ramp = len(steps) - args.decode_steps
    growth = [len(set(s)) - len(set(p)) for p, s in itertools.pairwise(steps[:ramp])]
    print(f"{ramp} ramp-up steps (distinct adapters per step grow by {min(growth)}-{max(growth)}), then "
          f"{args.decode_steps} decode steps of {args.requests} rows")  # fmt: skip
    old = old_plan_module(args.old_ref)
    results: dict[str, list[list[tuple[float, float]]]] = {"old": [], "new": []}
    last: dict[str, LoraPlan] = {}
    for _ in range(args.repeats):
        for name in results:
            last.pop(name, None)  # the old pass's stacks go before the new pass makes its own
            build = old_builder(config, old) if name == "old" else new_builder(config)[0]
            times, last[name] = run_pass(build, steps, adapters, config, dtype)
            results[name].append(times)
            del build
    # Steady decode once more, the two final plans alternating step by step: the other passes' timings
    # are minutes apart, and a shared machine's load moves in between.
    xs, ys = activations(args.requests, config, dtype, torch.Generator().manual_seed(3))
    steady: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.steady_steps):
        for name, plan in last.items():
            start = time.perf_counter()
            apply_all(plan, xs, ys, config.num_layers)
            steady[name].append(time.perf_counter() - start)
    report: dict[str, dict[str, float]] = {}
    for name, passes in results.items():
        best: dict[str, float] = {}
        for label, part in (("ramp", slice(0, ramp)), ("decode", slice(ramp + 1, None))):
            # The first decode step builds the steady plan; the others only apply it.
            best[f"{label}_build_s"] = min(sum(b for b, _ in p[part]) for p in passes)
            best[f"{label}_apply_s"] = min(sum(a for _, a in p[part]) for p in passes)
            best[f"{label}_s"] = min(sum(b + a for b, a in p[part]) for p in passes)
        best["first_decode_s"] = min(sum(p[ramp]) for p in passes)
        best["steady_min_s"] = min(steady[name])
        best["steady_median_s"] = statistics.median(steady[name])
        report[name] = best
        per_step = best["decode_s"] / max(1, args.decode_steps - 1) * 1e3
        print(
            f"{name}: ramp-up {best['ramp_s']:.2f} s (build {best['ramp_build_s']:.2f}, "
            f"apply {best['ramp_apply_s']:.2f}); first decode step {best['first_decode_s']:.3f} s; "
            f"then {per_step:.1f} ms a step; alternating: min {best['steady_min_s'] * 1e3:.1f} ms, "
            f"median {best['steady_median_s'] * 1e3:.1f} ms"
        )
    keys = ("ramp_s", "first_decode_s", "decode_s", "steady_min_s", "steady_median_s")
    ratio = {k: report["new"][k] / report["old"][k] for k in keys}
    print(f"new / old: ramp-up {ratio['ramp_s']:.3f}, first decode step {ratio['first_decode_s']:.3f}, "
          f"steady decode {ratio['decode_s']:.3f} (alternating: min {ratio['steady_min_s']:.3f}, "
          f"median {ratio['steady_median_s']:.3f})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"report": report, "ratio": ratio, "args": vars(args) | {"json": None}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
