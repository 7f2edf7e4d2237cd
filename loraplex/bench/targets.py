"""The six performance targets from a suite's summaries, and the cost-per-token curves against adapters."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from loraplex.bench.floor import Floor
from loraplex.bench.stats import Summary


def _ratio(a: Summary | None, b: Summary | None) -> float:
    if a is None or b is None or b.tokens_per_s <= 0:
        return math.nan
    return a.tokens_per_s / b.tokens_per_s


def evaluate_targets(s: Mapping[str, Summary], floor: Floor) -> list[dict[str, Any]]:
    """Each target: what is divided by what, the measured value, the goal and whether it is met."""
    heavy = s.get("heavy")
    vs_floor = heavy.seconds / floor.seconds if heavy is not None else math.nan
    rows = [
        ("1", "loraplex distinct ÷ peft mixed batches", _ratio(s.get("distinct"), s.get("peft-mixed")), ">=", 4.0),
        (
            "2",
            "loraplex distinct ÷ peft one at a time",
            _ratio(s.get("distinct"), s.get("peft-sequential")),
            ">=",
            20.0,
        ),
        ("3", "loraplex distinct ÷ loraplex base only", _ratio(s.get("distinct"), s.get("base")), ">=", 0.85),
        ("4", "loraplex base only ÷ transformers generate", _ratio(s.get("base"), s.get("transformers")), ">=", 1.0),
        ("5", "loraplex zipf many ÷ zipf few adapters", _ratio(s.get("zipf-many"), s.get("zipf-few")), ">=", 0.8),
        ("6", "loraplex heavy time ÷ floor time", vs_floor, "<=", 1.2),
    ]
    out = []
    for number, name, value, op, goal in rows:
        met = (value >= goal) if op == ">=" else (value <= goal)
        out.append(
            {
                "target": number,
                "what": name,
                "value": value,
                "goal": f"{op} {goal}",
                "met": bool(met and not math.isnan(value)),
            }
        )
    return out


def targets_table(targets: list[dict[str, Any]], floor: Floor) -> str:
    lines = [f"{'#':<3}{'target':<46}{'measured':>10}{'goal':>10}  met"]
    for t in targets:
        lines.append(
            f"{t['target']:<3}{t['what']:<46}{t['value']:>10.3f}{t['goal']:>10}  {'yes' if t['met'] else 'NO'}"
        )
    lines.append(
        f"floor for #6: base {floor.base_seconds:.2f} s + {floor.adapter_bytes / 1e9:.2f} GB of adapter reads at "
        f"{floor.bandwidth / 1e9:.1f} GB/s = {floor.seconds:.2f} s"
    )
    return "\n".join(lines)


def _interp_loglog(x: float, points: list[tuple[float, float]]) -> float:
    """Piecewise-linear interpolation in log-log space, clamped to the end points."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


def cost_curves(s: Mapping[str, Summary], concurrency: int, few: int, many: int) -> dict[str, Any]:
    """Relative cost per output token (1 = loraplex, base model, ``concurrency`` streams) against adapters.

    The offered load is fixed: ``concurrency`` streams spread evenly over N adapters. loraplex serves them all
    from one deployment: its cost per token is the inverse of its measured throughput with N adapters (base,
    few, distinct = ``concurrency``, many), interpolated between those. One dedicated deployment per adapter
    (each a merged model, as fast as the base) runs ``concurrency / N`` streams; its throughput at that batch
    size is interpolated from the base model measured at 1, ``concurrency / 8`` and ``concurrency`` streams,
    and past ``concurrency`` adapters each of the N machines idles most of the time and still costs the same.
    """
    ref = s["base"].tokens_per_s
    by_batch = [
        (1.0, s["base-c1"].tokens_per_s),
        (float(max(1, concurrency // 8)), s[f"base-c{max(1, concurrency // 8)}"].tokens_per_s),
        (float(concurrency), ref),
    ]
    measured = [
        (1.0, 1.0),
        (float(few), ref / s["zipf-few"].tokens_per_s),
        (float(concurrency), ref / s["distinct"].tokens_per_s),
        (float(many), ref / s["zipf-many"].tokens_per_s),
    ]
    measured = sorted({x: y for x, y in measured}.items())
    adapters = sorted({round(10 ** (k / 8)) for k in range(0, 8 * math.ceil(math.log10(many)) + 1)} | {many})
    adapters = [a for a in adapters if a <= many]
    dedicated = []
    for n in adapters:
        if n <= concurrency:
            dedicated.append(ref / _interp_loglog(concurrency / n, by_batch))
        else:
            dedicated.append((n / concurrency) * ref / by_batch[0][1])
    loraplex = [_interp_loglog(float(n), measured) for n in adapters]
    return {"adapters": adapters, "loraplex": loraplex, "dedicated": dedicated, "measured": measured}
