"""The six targets, #6's floor and the run summaries, from hand-made numbers whose answers are known."""

from __future__ import annotations

import itertools
import math

import pytest

from loraplex.bench.clients import RequestResult
from loraplex.bench.floor import Floor, adapter_bytes_read, read_bandwidth
from loraplex.bench.stats import Summary, percentile, summarize
from loraplex.bench.targets import cost_curves, evaluate_targets


def _summary(name: str, tokens_per_s: float, seconds: float = 10.0) -> Summary:
    return Summary(name, name, 64, 0, 4096, 0, seconds, 6.4, tokens_per_s)


def _suite(**tokens_per_s: float) -> dict[str, Summary]:
    return {name.replace("_", "-"): _summary(name, value) for name, value in tokens_per_s.items()}


def test_each_target_divides_the_right_pair_and_checks_the_right_direction() -> None:
    s = _suite(
        base=400.0, distinct=360.0, zipf_few=300.0, zipf_many=270.0, transformers=250.0, peft_mixed=100.0,
        peft_sequential=30.0,
    )  # fmt: skip
    s["heavy"] = _summary("heavy", 260.0, seconds=12.0)
    floor = Floor(base_seconds=9.0, adapter_bytes=40e9, bandwidth=40e9)  # 10 s
    by_number = {t["target"]: t for t in evaluate_targets(s, floor)}
    assert by_number["1"]["value"] == pytest.approx(3.6) and not by_number["1"]["met"]
    assert by_number["2"]["value"] == pytest.approx(12.0) and not by_number["2"]["met"]
    assert by_number["3"]["value"] == pytest.approx(0.9) and by_number["3"]["met"]
    assert by_number["4"]["value"] == pytest.approx(1.6) and by_number["4"]["met"]
    assert by_number["5"]["value"] == pytest.approx(0.9) and by_number["5"]["met"]
    assert by_number["6"]["value"] == pytest.approx(1.2) and by_number["6"]["met"]  # at the goal: met
    s["heavy"] = _summary("heavy", 260.0, seconds=12.1)
    six = evaluate_targets(s, floor)[5]
    assert six["goal"] == "<= 1.2" and not six["met"]  # #6 is a time: larger is worse


def test_a_missing_system_is_nan_and_never_met() -> None:
    s = _suite(base=400.0, distinct=360.0)
    targets = evaluate_targets(s, Floor(1.0, 0.0, 1.0))
    assert [t["met"] for t in targets] == [False, False, True, False, False, False]
    assert math.isnan(targets[0]["value"]) and math.isnan(targets[5]["value"])


def test_floor_reads_decode_rows_in_float32_and_prefill_rows_in_the_model_dtype() -> None:
    numel = 1000
    # 64 prefill rows and 63 decode steps of 64 rows: the decode rows read 4 bytes an element.
    assert adapter_bytes_read(64 * 64, 64, numel, 2) == (64 * 63 * 4 + 64 * 2) * numel
    assert adapter_bytes_read(64 * 64, 64, numel, 4) == 64 * 64 * 4 * numel
    floor = Floor(base_seconds=8.0, adapter_bytes=50e9, bandwidth=25e9)
    assert floor.seconds == pytest.approx(10.0)


def test_read_bandwidth_is_a_real_rate() -> None:
    rate = read_bandwidth(gib=0.125, repeats=2)
    assert 1e8 < rate < 1e13  # bytes/s: between a slow disk and no machine yet built


def test_dedicated_deployments_cost_grows_with_adapters_and_loraplex_follows_its_measurements() -> None:
    s = _suite(base=400.0, distinct=320.0, zipf_few=380.0, zipf_many=300.0, base_c1=40.0, base_c8=200.0)
    curves = cost_curves(s, concurrency=64, few=8, many=1000)
    adapters, ours, dedicated = curves["adapters"], curves["loraplex"], curves["dedicated"]
    assert adapters[0] == 1 and adapters[-1] == 1000
    at = dict(zip(adapters, ours, strict=True))
    assert at[1] == pytest.approx(1.0) and at[1000] == pytest.approx(400 / 300)
    dedicated_at = dict(zip(adapters, dedicated, strict=True))
    assert dedicated_at[1] == pytest.approx(1.0)  # one deployment of the base model is loraplex's reference
    assert dedicated_at[100] == pytest.approx(100 / 64 * 400 / 40)  # past 64 each idles and still costs
    assert dedicated_at[1000] == pytest.approx(1000 / 64 * 400 / 40)
    assert all(a <= b for a, b in itertools.pairwise(dedicated))


def test_percentile_interpolates_and_summaries_count_only_successes() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0 and math.isnan(percentile([], 50))
    ok = RequestResult(0, None, sent=0.0, token_times=[0.5, 0.7, 1.0], done=1.0)
    short = RequestResult(1, "a", sent=0.0, token_times=[0.4, 0.6], done=0.8)
    failed = RequestResult(2, "b", sent=0.0, error="HTTP 500: boom", done=0.1)
    s = summarize("loraplex", "w", [ok, short, failed], started=0.0, ended=2.0, max_new_tokens=3)
    assert (s.requests, s.failed, s.output_tokens, s.short) == (3, 1, 5, 1)
    assert s.tokens_per_s == pytest.approx(2.5) and s.req_per_s == pytest.approx(1.0)
    assert s.ttft_p50 == pytest.approx(0.45)
    assert s.itl_p50 == pytest.approx(0.2)  # gaps 0.2, 0.3 and 0.2
