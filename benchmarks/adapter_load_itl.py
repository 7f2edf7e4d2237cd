"""Inter-token latency of running streams while other adapters load from disk, against the same without loads.

Run: ``.venv/bin/python benchmarks/adapter_load_itl.py [--json out.json]``

A real launcher (shard + router) serves the embedded SmolLM2 with an adapter root holding large adapters
(rank 64 on all seven projections, ~78 MB each in float32). Rounds alternate: streams alone, then the same
streams while big adapters are loaded one after another through the admin API. The client timestamps
every streamed token; the figure is p99 of the gaps between consecutive tokens of a stream.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.bench.adapters import ALL_PROJECTIONS, ATTENTION, write_adapter
from loraplex.shard.config import ModelConfig
from loraplex.shard.embedded import embedded_model_dir

ADMIN = "bench-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stream_gaps(url: str, adapter: str, tokens: int, out: list[float]) -> None:
    # A chat-formatted prompt: the instruct model answers at length instead of ending at once.
    prompt = "<|im_start|>user\nTell me a long story about the sea.<|im_end|>\n<|im_start|>assistant\n"
    body = {"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": tokens}}
    stamps = []
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=300) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"stream refused: {resp.status_code} {resp.read().decode()}")
        for line in resp.iter_lines():
            if line.startswith("data:"):
                stamps.append(time.perf_counter())
    out.extend(b - a for a, b in itertools.pairwise(stamps[1:]))  # the first gap includes prefill


def _round(url: str, streams: int, tokens: int, loads: list[str]) -> tuple[list[float], list[float]]:
    gaps: list[float] = []
    load_seconds: list[float] = []
    threads = [threading.Thread(target=_stream_gaps, args=(url, "hot", tokens, gaps)) for _ in range(streams)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the streams are decoding before the first load starts
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for adapter in loads:
        started = time.perf_counter()
        resp = httpx.post(url + "/adapters", json={"id": adapter}, headers=admin, timeout=300)
        resp.raise_for_status()
        load_seconds.append(time.perf_counter() - started)
        httpx.delete(url + f"/adapters/{adapter}", headers=admin, timeout=300).raise_for_status()
    for t in threads:
        t.join()
    return gaps, load_seconds


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", type=int, default=3, help="big adapters loaded (and unloaded) per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model_dir = embedded_model_dir()
    config = ModelConfig.from_dir(model_dir)
    with tempfile.TemporaryDirectory(prefix="loraplex-itl-") as tmp:
        root = Path(tmp) / "adapters"
        write_adapter(root / "hot", config, 8, ATTENTION, seed=1)
        big = [f"big{i}" for i in range(args.loads)]
        for i, name in enumerate(big):
            write_adapter(root / name, config, 64, ALL_PROJECTIONS, seed=10 + i)
        big_bytes = (root / big[0] / "adapter_model.safetensors").stat().st_size
        port = _free_port()
        cmd = [
            str(Path(sys.executable).parent / "loraplex-launcher"),
            "--port", str(port), "--grpc-port", "0", "--adapter-dirs", str(root), "--admin-token", ADMIN,
            "--max-active-adapters", "4", "--max-cpu-adapters", "4",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError("the server died: " + (proc.stderr.read().decode() if proc.stderr else ""))
                time.sleep(0.5)
            _round(url, args.streams, 16, [])  # warm-up: the hot adapter loads, buffers settle
            quiet: list[float] = []
            busy: list[float] = []
            load_times: list[float] = []
            for _ in range(args.rounds):
                gaps, _ = _round(url, args.streams, args.tokens, [])
                quiet.extend(gaps)
                gaps, loads = _round(url, args.streams, args.tokens, big)
                busy.extend(gaps)
                load_times.extend(loads)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    result: dict[str, Any] = {
        "streams": args.streams,
        "adapter_mb": round(big_bytes / 1e6, 1),
        "load_seconds_median": round(statistics.median(load_times), 3),
        "itl_p50_ms_quiet": round(1000 * statistics.median(quiet), 2),
        "itl_p50_ms_loading": round(1000 * statistics.median(busy), 2),
        "itl_p99_ms_quiet": round(1000 * _p99(quiet), 2),
        "itl_p99_ms_loading": round(1000 * _p99(busy), 2),
    }
    result["p99_ratio"] = round(result["itl_p99_ms_loading"] / result["itl_p99_ms_quiet"], 3)
    print(json.dumps(result, indent=2))
    print(
        f"\nITL p99 while {args.loads} x {result['adapter_mb']} MB adapters load: {result['itl_p99_ms_loading']} ms "
        f"vs {result['itl_p99_ms_quiet']} ms without loads -> {result['p99_ratio']}x (target <= 2x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
