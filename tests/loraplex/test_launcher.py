"""The launcher: forwards the shard's own flags, starts shard and router as separate processes, serves, stops cleanly,
fails loudly; the supervisor it shares with the container entry point."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from loraplex.common.shutdown import DRAIN_TIMEOUT
from loraplex.launcher import PLACEMENT, router_environment, router_flags, shard_flags
from loraplex.launcher import parser as launcher_parser
from loraplex.router.settings import router_parser, settings_from_args
from loraplex.shard.settings import DEFAULT_MAX_LORA_RANK, shard_parser
from loraplex.supervisor import Supervisor, exit_status, rank_environment, rendezvous
from tests.listening import is_loopback, listening
from tests.servers import free_port

ADMIN_TOKEN = "admin-token-that-ps-must-not-show-0123"


def _launch(
    model_dir: Path, adapters: dict[str, Path], log: Path, num_shard: int = 1, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    spec = ",".join(f"{n}={p}" for n, p in list(adapters.items())[:2])
    cmd = [
        sys.executable,
        "-m",
        "loraplex.launcher",
        "--model-id",
        str(model_dir),
        "--lora-adapters",
        spec,
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--max-input-tokens",
        "200",
        "--max-total-tokens",
        "300",
        "--max-batch-total-tokens",
        "8192",
        "--num-shard",
        str(num_shard),
        "--json-output",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(log.read_text())


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _is_shard(pid: int) -> bool:
    args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return any(a.endswith("loraplex-shard") for a in args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_serves_then_sigterm_stops_everything_with_exit_0(
    served_model: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    model_dir, adapters = served_model
    proc, url = _launch(model_dir, adapters, tmp_path / "launcher.log", extra=("--admin-token", ADMIN_TOKEN))
    children = _children(proc.pid)
    assert len(children) == 2  # one shard, one router
    # The admin token reaches the router (its admin API takes it) but no command line: `ps` shows those to
    # every user of the host.
    for pid in children:
        assert ADMIN_TOKEN not in Path(f"/proc/{pid}/cmdline").read_text(), "the token is on a command line"
    assert httpx.get(url + "/adapters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    assert httpx.post(url + "/adapters", json={"adapter_id": "x"}).status_code == 401
    adapter = next(iter(adapters))
    r = httpx.post(
        url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": adapter, "max_new_tokens": 3}}, timeout=60
    )
    assert r.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not any(_alive(c) for c in children)


@pytest.mark.parametrize("num_shard", [1, 2])
def test_a_dead_shard_takes_the_launcher_down_non_zero(
    served_model: tuple[Path, dict[str, Path]], tmp_path: Path, num_shard: int
) -> None:
    model_dir, adapters = served_model
    proc, _ = _launch(model_dir, adapters, tmp_path / "launcher.log", num_shard)
    children = _children(proc.pid)
    shards = [c for c in children if _is_shard(c)]
    assert len(shards) == num_shard
    # The sockets (and the ranks' rendezvous file) live in this run's own directory, which only its user may
    # enter; and no rank listens off loopback (torch's tcp:// store on rank 0 would listen on every interface).
    listen = Path(f"/proc/{shards[0]}/cmdline").read_text().split("\0")
    sock = Path(listen[listen.index("--listen") + 1].removeprefix("unix://"))
    run_dir = sock.parent
    assert run_dir != Path(tempfile.gettempdir()) and (run_dir.stat().st_mode & 0o777) == 0o700
    for pid in shards:
        exposed = [(a, port) for a, port in listening(pid) if not is_loopback(a)]
        assert not exposed, f"rank pid {pid} listens on {exposed}"
    # Real tensor parallelism: the ranks joined one group and each holds its own part of the model
    # (the router also refuses shards that report another rank or world size than their place).
    ready = [
        json.loads(line) for line in (tmp_path / "launcher.log").read_text().splitlines() if '"shard ready"' in line
    ]
    assert sorted(r["rank"] for r in ready) == list(range(num_shard))
    assert len({r["sharded_weight_bytes"] for r in ready}) == 1  # equal slices
    os.kill(shards[-1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    time.sleep(0.5)
    assert not any(_alive(c) for c in children)
    assert "exited" in (tmp_path / "launcher.log").read_text()
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--num-shard", "0"], "--num-shard"),
        (["--max-input-tokens", "many"], "--max-input-tokens"),
        (["--dtype", "int3"], "--dtype"),
    ],
)
def test_bad_flags_are_one_line_exit_2(args: list[str], words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.launcher", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_env_twins_are_read(tmp_path: Path) -> None:
    env = {**os.environ, "MAX_INPUT_TOKENS": "many"}
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.launcher"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 2 and "MAX_INPUT_TOKENS" in proc.stderr


def test_shard_with_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.shard.main", "--model-id", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_the_launcher_and_the_shards_flags_import_no_torch() -> None:
    """The launcher outlives everything it starts: reading the shard's flags must not load torch (~1.7 s and
    hundreds of MB in a process that only supervises). A fresh interpreter, away from the repository."""
    code = "import sys, loraplex.launcher, loraplex.shard.settings; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


def test_the_launcher_offers_every_shard_flag_with_the_shards_twin_and_default() -> None:
    launcher, shard = launcher_parser(), shard_parser()
    for name, spec in shard.flags.items():
        if name in PLACEMENT:
            assert name not in launcher.flags
            continue
        assert launcher.flags[name].env == spec.env, name
        assert launcher.get_default(spec.dest) == shard.get_default(spec.dest), name
    assert launcher.get_default("max_lora_rank") == DEFAULT_MAX_LORA_RANK
    assert launcher.get_default("drain_timeout") == DRAIN_TIMEOUT


def test_flags_the_router_and_the_shard_share_have_one_default() -> None:
    router, shard = router_parser(), shard_parser()
    shared = router.flags.keys() & shard.flags.keys()
    assert {"--drain-timeout", "--max-batch-total-tokens", "--json-output"} <= shared
    for name in shared:
        dest = shard.flags[name].dest
        assert router.get_default(dest) == shard.get_default(dest), name


def test_each_rank_and_the_router_get_the_launchers_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the launcher resolved (flag over twin) is what the children parse, even where their twins differ."""
    monkeypatch.setenv("MAX_LORA_RANK", "64")
    monkeypatch.setenv("KV_BLOCK_SIZE", "32")
    p = launcher_parser()
    argv = ["--max-lora-rank", str(DEFAULT_MAX_LORA_RANK), "--drain-timeout", "3", "--model-id=-odd", "--json-output"]
    args = p.parse(argv)
    rank = shard_parser().parse(shard_flags(p, args))
    assert (rank.max_lora_rank, rank.block_size, rank.drain_timeout) == (DEFAULT_MAX_LORA_RANK, 32, 3.0)
    assert (rank.model_id, rank.json_output) == ("-odd", True)
    forwarded = [spec.dest for name, spec in shard_parser().flags.items() if name not in (*PLACEMENT, "--num-shard")]
    assert {d: getattr(rank, d) for d in forwarded} == {d: getattr(args, d) for d in forwarded}
    router = settings_from_args(["--shard-uds=unix:///x.sock", *router_flags(p, args)])
    assert (router.drain_timeout, router.json_output) == (3.0, True)


def test_the_admin_token_goes_to_the_router_by_its_twin_and_wins_over_the_launchers_twin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "from-the-environment")
    p = launcher_parser()
    args = p.parse(["--admin-token", ADMIN_TOKEN])
    argv = router_flags(p, args)
    assert not [a for a in argv if ADMIN_TOKEN in a or a.startswith("--admin-token")]
    env = router_environment(p, args, {"ADMIN_TOKEN": "from-the-environment", "PATH": "/bin"})
    assert env == {"ADMIN_TOKEN": ADMIN_TOKEN, "PATH": "/bin"}
    monkeypatch.setenv("ADMIN_TOKEN", env["ADMIN_TOKEN"])
    assert settings_from_args(["--shard-uds=unix:///x.sock", *argv]).admin_token == ADMIN_TOKEN
    # Unset on the launcher's command line: the launcher's own twin, passed on as such.
    monkeypatch.setenv("ADMIN_TOKEN", "from-the-environment")
    p = launcher_parser()
    assert router_environment(p, p.parse([]), {})["ADMIN_TOKEN"] == "from-the-environment"


def test_exit_status_of_a_process_that_ended_unasked() -> None:
    assert [exit_status(c) for c in (5, 0, -signal.SIGKILL)] == [5, 1, 128 + signal.SIGKILL]


def test_the_supervisor_stops_the_rest_when_one_ends() -> None:
    supervisor = Supervisor("test")
    sleeper = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor.start("quitter", [sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    assert supervisor.run(stop_order=[["quitter"], ["sleeper"]], grace=60) == 3
    assert sleeper.returncode == -signal.SIGTERM and time.monotonic() - started < 30


def test_the_supervisor_stops_everything_when_not_ready_in_time() -> None:
    supervisor = Supervisor("test")
    sleeper = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    assert supervisor.run(stop_order=[["sleeper"]], grace=60, ready=lambda: False, ready_timeout=0.5) == 1
    assert sleeper.returncode == -signal.SIGTERM and time.monotonic() - started < 30


def _refused_launch(*flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "loraplex.launcher", "--port", str(free_port()), "--grpc-port", str(free_port())]
    return subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=300)


def test_the_launcher_passes_on_a_missing_model_as_the_shards_one_line_exit_2(tmp_path: Path) -> None:
    """SPEC §2: the shard's refusal is the only line on stderr (no supervisor line after it) and the exit is 2."""
    proc = _refused_launch("--model-id", str(tmp_path / "nope"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"loraplex-shard: error: model directory {tmp_path / 'nope'} does not exist"
    ]


def test_the_launcher_passes_on_a_truncated_adapter_as_the_shards_one_line_exit_2(
    served_model: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    model_dir, adapters = served_model
    broken = tmp_path / "broken"
    shutil.copytree(next(iter(adapters.values())), broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = _refused_launch("--model-id", str(model_dir), "--lora-adapters", f"cut={broken}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("loraplex-shard: error: adapter 'cut':") and "corrupt or truncated" in lines[0]


def test_ranks_keep_gloo_and_nccl_on_loopback_unless_told_otherwise() -> None:
    """Every rank the launcher or the entry point starts is on this host: their collectives' own sockets need no
    other interface (in a container the host name resolves to its network address)."""
    loopback = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert rank_environment({"PATH": "/bin"}) == {"PATH": "/bin", **loopback}
    assert rank_environment({"NCCL_SOCKET_IFNAME": "ib0"})["NCCL_SOCKET_IFNAME"] == "ib0"
    assert rendezvous("/run/x") == "file:///run/x/rendezvous"
