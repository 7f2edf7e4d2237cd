"""Process supervision shared by ``loraplex-launcher`` and the container entry point: start, watch, stop in order."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# After one process died the others have nothing left to finish: this is all they get before SIGKILL.
FAILURE_GRACE = 10.0
POLL_SECONDS = 0.2
# The status of ``loraplex.common.flags.fail`` (bad flags, a missing model, a broken adapter): the process
# has already said why in one line, which is all SPEC §2 allows on stderr.
REFUSED = 2


def command(script: str, module: str) -> list[str]:
    """The console script beside this interpreter (so that ``ps`` shows each role), else on PATH, else
    ``python -m``."""
    beside = Path(sys.executable).parent / script
    if beside.exists():
        return [str(beside)]
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def shard_socket(directory: Path | str, rank: int) -> str:
    """The unix socket address rank ``rank`` listens on and the router dials."""
    return f"unix://{Path(directory) / f'shard-{rank}.sock'}"


# Every rank of a group runs on this host, so gloo's and NCCL's own sockets (pair connections, NCCL's
# bootstrap) need only the loopback interface; left alone they bind the address the host name resolves to,
# which in a container is its network address. A value in the environment still wins.
LOCAL_GROUP_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a rank: the group's sockets on loopback unless ``env`` says otherwise."""
    return {**LOCAL_GROUP_ENV, **env}


def rendezvous(directory: Path | str) -> str:
    """The ranks' torch.distributed init method: a file in ``directory`` (private to this run), which binds no
    port, unlike ``tcp://`` whose store on rank 0 listens on every interface whatever the address says."""
    return f"file://{Path(directory) / 'rendezvous'}"


def shard_argv(program: Sequence[str], rank: int, world: int, listen: str, flags: Sequence[str] = ()) -> list[str]:
    """One rank's ``loraplex-shard`` command line: its place in the group first, then the shared flags."""
    return [*program, "--rank", str(rank), "--num-shard", str(world), "--listen", listen, *flags]


def exit_status(returncode: int) -> int:
    """The status to exit with when a supervised process ended by itself: its own, 128+N for signal N, and
    1 for a clean exit (nothing supervised may end unasked)."""
    if returncode > 0:
        return returncode
    return 128 - returncode if returncode < 0 else 1


class Supervisor:
    """Named child processes that live and die as a unit: when one ends the others are stopped."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT ask for an orderly stop (``run`` returns 0) instead of killing this process."""

        def on_signal(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def start(self, role: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), env=None if env is None else dict(env))
        self.procs[role] = proc
        return proc

    def say(self, message: str) -> None:
        print(f"{self.prog}: {message}", file=sys.stderr)

    def run(
        self,
        stop_order: Sequence[Sequence[str]],
        grace: float,
        ready: Callable[[], bool] | None = None,
        ready_timeout: float = float("inf"),
        on_ready: Callable[[], None] | None = None,
    ) -> int:
        """Watch until a signal (stop everything, 0), a process's end (stop the rest, non-zero: its status, a
        refusal's 2 without a line of ours) or, with ``ready``, a start-up that takes longer than
        ``ready_timeout`` (stop everything, 1).

        ``stop_order`` lists groups of roles: each group is signalled at once and given ``grace`` seconds
        before the next group is stopped (the router drains before the shards it needs do).
        """
        deadline = time.monotonic() + ready_timeout
        is_ready = ready is None
        while not self.stopping:
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    if proc.returncode != REFUSED:  # a refusal's own line must stay the only one
                        self.say(f"{role} exited with {proc.returncode}; stopping the others")
                    self.stop(stop_order, FAILURE_GRACE)
                    return exit_status(proc.returncode)
            if not is_ready and ready is not None and ready():
                is_ready = True
                if on_ready is not None:
                    on_ready()
            if not is_ready and time.monotonic() > deadline:
                self.say(f"not ready after {ready_timeout:g} s; stopping everything")
                self.stop(stop_order, FAILURE_GRACE)
                return 1
            time.sleep(POLL_SECONDS)
        self.stop(stop_order, grace)
        return 0

    def stop(self, stop_order: Sequence[Sequence[str]], grace: float) -> None:
        """SIGTERM group by group; whoever is still running ``grace`` seconds after its signal is killed.
        Roles that ``stop_order`` leaves out are stopped last."""
        listed = {role for group in stop_order for role in group}
        rest = [role for role in self.procs if role not in listed]
        for group in [*stop_order, rest]:
            procs = [self.procs[role] for role in group if role in self.procs]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            until = time.monotonic() + grace
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, until - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
