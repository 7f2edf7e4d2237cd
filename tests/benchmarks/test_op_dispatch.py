"""The dispatch benchmark runs and reports each way of calling the SGMV op (its figures are not asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks import op_dispatch


def test_the_dispatch_benchmark_reports_every_way_of_calling(capsys: pytest.CaptureFixture[str]) -> None:
    assert op_dispatch.main(["--calls", "20", "--segments", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["segments"] == 3
    for key in ("direct_us", "library_op_us", "custom_op_us"):
        assert result[key] > 0, key
    assert result["library_dispatch_us"] == pytest.approx(result["library_op_us"] - result["direct_us"], abs=0.11)
