"""``loraplex-bench`` as a user runs it: a workload plus baselines against a server, and the suite in quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.loraplex.bench.conftest import BenchWorld

PNG = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "loraplex.bench.cli", *args, "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_run_with_baselines_writes_table_json_and_plots(world: BenchWorld, tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = tmp_path / "adapters"
    done = _bench(
        "--url", world.server.url, "--model-id", str(world.model_dir), "--requests", "10", "--adapters", "5",
        "--popularity", "zipf", "--namespace", "cli/r2", "--rank", "2", "--targets", "q_proj,v_proj",
        "--adapter-root", str(world.root), "--write-adapters", "--prompt-tokens", "9", "--max-new-tokens", "4",
        "--concurrency", "4", "--baselines", "all", "--baseline-batch", "5", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stdout and "loraplex ÷ peft-mixed" in done.stdout
    report = json.loads((out / "bench.json").read_text())
    systems = [s["system"] for s in report["summaries"]]
    assert systems == ["loraplex", "transformers", "peft-sequential", "peft-mixed"]
    for s in report["summaries"]:
        for key in ("requests", "failed", "output_tokens", "seconds", "req_per_s", "tokens_per_s", "ttft_p99"):
            assert s[key] is not None, key
        assert s["requests"] == 10 and s["failed"] == 0
    tokens = sum(r["tokens"] for r in report["requests"])
    assert report["server_metrics"]["loraplex_output_tokens_total"] == tokens == report["summaries"][0]["output_tokens"]
    assert {r["adapter"].split("/")[0] for r in report["requests"]} == {"cli"}
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == PNG
    assert not root.exists()


def test_bad_flags_are_one_line_exit_2(world: BenchWorld) -> None:
    done = _bench("--url", world.server.url, "--baselines", "vllm")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--baselines" in done.stderr


def test_suite_quick(world: BenchWorld, tmp_path: Path) -> None:
    out = tmp_path / "suite"
    done = _bench(
        "suite", "--quick", "--model-id", str(world.model_dir), "--dtypes", "float32", "--out", str(out),
        "--work-dir", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "suite.json").read_text())
    (result,) = report["results"]
    assert [t["target"] for t in result["targets"]] == ["1", "2", "3", "4", "5", "6"]
    assert all(isinstance(t["value"], float) and t["value"] > 0 for t in result["targets"])
    s = result["summaries"]
    for name in ("base", "distinct", "heavy", "zipf-few", "zipf-many", "transformers", "peft-mixed", "peft-sequential"):
        assert s[name]["failed"] == 0 and s[name]["output_tokens"] > 0, name
    # screened prompts run their full length on the base model; baselines always produce exactly N tokens
    assert s["base"]["output_tokens"] == s["transformers"]["output_tokens"] == s["peft-mixed"]["output_tokens"] == 64
    assert s["base"]["short"] == 0 and s["distinct"]["output_tokens"] <= 64
    floor = result["floor"]
    assert floor["bandwidth"] > 1e8 and floor["seconds"] > floor["base_seconds"] > 0
    assert floor["rows"] == result["server_metrics"]["heavy"]["loraplex_batch_size_sum"]
    curve = result["cost_curve"]
    assert curve["adapters"][0] == 1 and curve["adapters"][-1] == 40
    # Past one stream per adapter, each added dedicated deployment idles and still costs a machine: the cost
    # grows in proportion (the curve's model, whatever the measured speeds).
    beyond = [(n, d) for n, d in zip(curve["adapters"], curve["dedicated"], strict=True) if n >= 8]
    assert len(beyond) >= 2 and all(abs(d / n - beyond[0][1] / beyond[0][0]) < 1e-9 for n, d in beyond)
    for name in ("throughput.png", "latency.png", "cost.png"):
        assert (out / "float32" / name).read_bytes()[:8] == PNG
    assert "floor for #6" in done.stdout
