"""``loraplex-launcher``: starts the shard process(es) and the router, supervises them, stops them cleanly."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from loraplex.common.flags import FlagParser, fail
from loraplex.router.settings import add_serving_flags

GRACE_SECONDS = 30.0


def parser() -> FlagParser:
    p = FlagParser(prog="loraplex-launcher", description=__doc__)
    p.flag("--model-id", default="", help="checkpoint directory or hub id; empty: the embedded SmolLM2")
    p.flag("--lora-adapters", default="", help="adapters to preload: name=/dir, /dir or hub/id[@rev]")
    p.flag("--num-shard", type=int, default=1, help="tensor-parallel degree")
    p.flag("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.flag("--device", default="cpu")
    p.flag("--max-lora-rank", type=int, default=128)
    p.flag("--adapter-dirs", default="", help="comma list of roots for adapters loaded on demand")
    p.flag("--max-active-adapters", type=int, default=64, help="adapters resident on the device at once")
    p.flag("--max-cpu-adapters", type=int, default=256, help="adapters kept in host memory")
    p.flag("--startup-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    add_serving_flags(p)
    return p


def _command(script: str, module: str) -> list[str]:
    """The console script beside this interpreter (so that ``ps`` shows each role), else ``python -m``."""
    path = Path(sys.executable).parent / script
    if path.exists():
        return [str(path)]
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """Router first (it drains), then the shards; whoever ignores SIGTERM past the grace period is killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse(argv)
    if args.num_shard < 1:
        fail("loraplex-launcher", "--num-shard must be at least 1")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="loraplex-") as run_dir:
        sockets = [f"unix://{Path(run_dir) / f'shard-{rank}.sock'}" for rank in range(args.num_shard)]
        shards = []
        master_port = str(_free_port())  # where the ranks meet for torch.distributed
        for rank, sock in enumerate(sockets):
            cmd = [
                *_command("loraplex-shard", "loraplex.shard.main"),
                "--listen",
                sock,
                "--rank",
                str(rank),
                "--num-shard",
                str(args.num_shard),
                "--master-port",
                master_port,
                "--dtype",
                args.dtype,
                "--device",
                args.device,
                "--max-batch-total-tokens",
                str(args.max_batch_total_tokens),
                "--max-lora-rank",
                str(args.max_lora_rank),
                "--max-active-adapters",
                str(args.max_active_adapters),
                "--max-cpu-adapters",
                str(args.max_cpu_adapters),
            ]
            if args.adapter_dirs:
                cmd += ["--adapter-dirs", args.adapter_dirs]
            if args.model_id:
                cmd += ["--model-id", args.model_id]
            if args.lora_adapters:
                cmd += ["--lora-adapters", args.lora_adapters]
            if args.json_output:
                cmd.append("--json-output")
            shards.append(subprocess.Popen(cmd))
        router_cmd = [*_command("loraplex-router", "loraplex.router.main"), "--shard-uds", ",".join(sockets)]
        router_cmd += ["--connect-timeout", str(args.startup_timeout)]
        for flag in (
            "max_input_tokens",
            "max_total_tokens",
            "max_batch_prefill_tokens",
            "max_batch_total_tokens",
            "max_concurrent_requests",
            "max_stop_sequences",
            "max_top_n_tokens",
            "max_batch_size",
            "hostname",
            "port",
            "grpc_port",
            "adapter_slot_patience",
            "drain_timeout",
            "max_body_bytes",
            "admin_token",
        ):
            value = getattr(args, flag)
            if value not in (None, ""):
                router_cmd += [f"--{flag.replace('_', '-')}", str(value)]
        if args.api_keys_file:
            router_cmd += ["--api-keys-file", str(args.api_keys_file)]
        if args.json_output:
            router_cmd.append("--json-output")
        router = subprocess.Popen(router_cmd)
        procs = [router, *shards]
        roles = {router.pid: "router", **{p.pid: f"shard {rank}" for rank, p in enumerate(shards)}}
        url = f"http://{'127.0.0.1' if args.hostname in ('0.0.0.0', '') else args.hostname}:{args.port}"
        deadline = time.monotonic() + args.startup_timeout
        ready = False
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(
                    f"loraplex-launcher: {roles[dead[0].pid]} exited with {dead[0].returncode}; stopping everything",
                    file=sys.stderr,
                )
                _stop(procs, 5.0)
                return 1
            if not ready and _healthy(url):
                ready = True
                print(f"loraplex-launcher: serving on {url} (gRPC on port {args.grpc_port})", file=sys.stderr)
            if not ready and time.monotonic() > deadline:
                print("loraplex-launcher: the server did not become healthy in time", file=sys.stderr)
                _stop(procs, 5.0)
                return 1
            time.sleep(0.5)
        _stop(procs, GRACE_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
