"""Host/device mixing, caught without a GPU: the shard's prefill, decode, LoRA and sampling on a non-CPU device.

Fake tensors raise on a CPU tensor meeting a device tensor in an op, as a GPU would. The stand-in device is
``meta``: this CPU build of torch cannot index fake *CUDA* tensors (``tensor[i]`` takes a CUDA device guard
it does not have), and every shard path that differs between CPU and GPU asks ``device.type != "cpu"``, so
``meta`` takes the GPU's branches. Host reads (``.item()``, ``.tolist()``) return zeros (or True): values
are meaningless here, placement is the point. A generator made for another device than the logits' is
caught where ``torch.multinomial`` meets it.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from loraplex.common.sampling import SamplingParams
from loraplex.kernels import cuda
from loraplex.shard.engine import NewRequest, ShardEngine
from loraplex.shard.kv_cache import KVCache
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
from loraplex.shard.runner import ModelRunner, build_runner
from tests.factories import make_adapter, tiny_model

aten = torch.ops.aten
DEVICE = torch.device("meta")


class DeviceCheck(FakeTensorMode):
    """Fake tensors whose host reads give placeholder values and whose draws check the generator's device."""

    def __init__(self, generator_devices: Generators) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.generator_devices = generator_devices
        self.draws = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        # ``torch.tensor(data, device=meta)`` makes a real meta tensor before fake mode sees it: adopt it.
        args = tuple(
            self.from_tensor(a) if isinstance(a, torch.Tensor) and a.is_meta and not self.is_our_fake(a) else a
            for a in args
        )
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        if func is aten.multinomial.default:
            gen = kwargs.pop("generator", None)
            if gen is not None:
                made_for = self.generator_devices.made_for(gen)
                # Probabilities on the stand-in's own device came from ``generator.device``: on a GPU that
                # is the device it was made for.
                if args[0].device not in (made_for, gen.device):
                    raise RuntimeError(f"a generator for {made_for} draws from probabilities on {args[0].device}")
            self.draws += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


class Generators:
    """Generators made while the check runs, each with the device it was asked for; a CPU generator stands
    in for it (none can be made for ``meta``). The dispatcher hands ops a new wrapper of the same generator,
    so a generator is known by its state, which fake draws never advance."""

    def __init__(self) -> None:
        self.made: list[tuple[torch.Generator, torch.device]] = []

    def made_for(self, gen: torch.Generator) -> torch.device | None:
        state = gen.get_state()
        devices = {d for g, d in self.made if torch.equal(g.get_state(), state)}
        return devices.pop() if len(devices) == 1 else None

    def devices(self) -> set[torch.device]:
        return {d for _, d in self.made}


@pytest.fixture
def generators(monkeypatch: pytest.MonkeyPatch) -> Generators:
    made = Generators()
    real = torch.Generator

    def generator(device: torch.device | str = "cpu") -> torch.Generator:
        gen = real()
        made.made.append((gen, torch.device(device)))
        return gen

    monkeypatch.setattr(torch, "Generator", generator)
    return made


def _engine_on(device: torch.device, tmp_path: Path, mode: DeviceCheck) -> ShardEngine:
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    cpu = build_runner(tmp_path / "base", kv_blocks=32, block_size=4)
    thread = ModelThread()
    store = AdapterStore(cpu.model.full_config, dtype=cpu.model.dtype, device=device, pace=thread.between_steps)
    for name in ("a", "b"):  # files are read on the host, before the check starts
        thread.call(store.load, name, tmp_path / name)
    thread.call(mode.__enter__)  # modes are per thread: the engine's model work runs on this one
    model = thread.call(cpu.model.to, device)
    cache = thread.call(
        KVCache, model.config, 32, 4, num_kv_heads=model.config.num_kv_heads, dtype=model.dtype, device=device
    )
    return ShardEngine(ModelRunner(model, cache), store, thread)


def test_prefill_decode_lora_and_sampling_keep_to_the_model_device(tmp_path: Path, generators: Generators) -> None:
    mode = DeviceCheck(generators)
    engine = _engine_on(DEVICE, tmp_path, mode)
    try:
        seeded = SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=3)
        requests = [
            NewRequest(1, [3, 4, 5, 6, 7], adapter_id="a", sampling=seeded),
            NewRequest(2, [8, 9], adapter_id="b", top_n_tokens=2),
            NewRequest(3, [1, 2, 3], prefill_logprobs=True),
            NewRequest(4, [5, 6, 7, 8], adapter_id="a", sampling=seeded, generated_tokens=1),  # a resumed one
        ]
        engine.prefill(1, requests)
        for _ in range(2):
            engine.decode([1])
        assert mode.draws >= 4  # the seeded requests drew on every step (and the resumed one replayed its draw)
        assert engine.runner.model.embed.device == DEVICE
        assert generators.devices() == {DEVICE}  # every sampler's generator was made for the logits' device
    finally:
        engine.model.call(mode.__exit__, None, None, None)
        engine.model.stop()


def test_the_check_catches_a_host_index_and_a_host_generator(generators: Generators) -> None:
    mode = DeviceCheck(generators)
    with mode:
        y = torch.zeros(4, 8, device=DEVICE)
        with pytest.raises(RuntimeError, match="same device"):
            y.index_add_(0, torch.tensor([0, 2]), torch.ones(2, 8, device=DEVICE))
        with pytest.raises(RuntimeError, match="generator for cpu"):
            torch.multinomial(torch.ones(8, device=DEVICE), 1, generator=torch.Generator())


def test_the_model_thread_makes_its_rank_gpu_current(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append((threading.current_thread().name, d)))
    thread = ModelThread(device="cuda:1")
    try:
        assert thread.call(lambda: 5) == 5
        assert seen == [("model", torch.device("cuda:1"))]
    finally:
        thread.stop()


def test_a_model_thread_that_cannot_use_its_gpu_fails_every_job_instead_of_hanging() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    thread = ModelThread(device="cuda:3")
    try:
        with pytest.raises(RuntimeError, match="cannot use cuda:3"):
            thread.call(lambda: 5)
    finally:
        thread.stop()


class _FakeCupy(types.ModuleType):
    """CuPy's launch surface, recording the device and stream each launch ran on (no GPU here)."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.launches: list[tuple[int, int]] = []
        self.current: list[Any] = []
        outer = self

        class _Ctx:
            def __init__(self, value: Any) -> None:
                self.value = value

            def __enter__(self) -> None:
                outer.current.append(self.value)

            def __exit__(self, *exc: object) -> None:
                outer.current.pop()

        class Module:
            def get_function(self, name: str) -> Any:
                def run(grid: Any, block: Any, args: Any) -> None:
                    device = next(v for v in reversed(outer.current) if v[0] == "device")[1]
                    stream = next(v for v in reversed(outer.current) if v[0] == "stream")
                    assert stream[2] == device, "stream of another device"
                    outer.launches.append((device, stream[1]))

                return run

        self.cuda = types.SimpleNamespace(
            Device=lambda index: _Ctx(("device", index)),
            ExternalStream=lambda ptr, device_id: _Ctx(("stream", ptr, device_id)),
        )
        self.RawModule = lambda **kwargs: Module()


def test_launches_go_to_the_tensor_device_and_its_current_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=1000 + index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda._module.cache_clear()
    try:
        cuda._cupy_launch("lora_shrink<__half, 1>", torch.device("cuda:2"), (1, 1, 1), (128, 1, 1), ())
        cuda._cupy_launch("lora_expand<__half, 1>", torch.device("cuda:1"), (1, 1, 1), (128, 1, 1), ())
    finally:
        cuda._module.cache_clear()
    assert fake.launches == [(2, 1002), (1, 1001)]


def test_the_lora_backend_check_names_what_is_missing() -> None:
    from loraplex.shard.main import check_lora_backend, main

    assert check_lora_backend("auto", "cpu", torch.float32, 128) is None
    assert check_lora_backend("torch", "cuda", torch.float32, 512) is None
    msg = check_lora_backend("cupy", "cpu", torch.float32, 128)
    assert msg is not None and "needs a CUDA device" in msg
    if not torch.cuda.is_available():
        msg = check_lora_backend("auto", "cuda", torch.bfloat16, 128)
        assert msg is not None and "no CUDA device" in msg and "--lora-backend torch" in msg
    with pytest.raises(SystemExit) as exit_info:
        main(["--lora-backend", "cupy", "--device", "cpu"])
    assert exit_info.value.code == 2


def _cuda_engine(tmp_path: Path) -> ShardEngine:
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=8, target_modules="all-linear")
    runner = build_runner(tmp_path / "base", dtype=torch.bfloat16, device="cuda", kv_blocks=64, block_size=4)
    thread = ModelThread(device="cuda")
    store = AdapterStore(runner.model.full_config, dtype=torch.bfloat16, device="cuda", pace=thread.between_steps)
    store.load("a", tmp_path / "a")
    return ShardEngine(runner, store, thread)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (scripts/gpu_check.sh)")
def test_a_seeded_sampled_request_on_cuda_does_not_depend_on_its_batch(tmp_path: Path) -> None:
    engine = _cuda_engine(tmp_path)
    seeded = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.95, seed=11)
    try:
        runs = []
        for batch_id, others in ((1, []), (2, [NewRequest(9, [5, 6, 7, 8], adapter_id="a")])):
            gens = engine.prefill(batch_id, [NewRequest(1, [3, 4, 5, 6], adapter_id="a", sampling=seeded), *others])
            tokens = [gens[0].choice.token_id]
            for _ in range(5):
                tokens.append(engine.decode([batch_id])[1][0].choice.token_id)
            engine.clear(batch_id)
            runs.append(tokens)
        assert runs[0] == runs[1]
    finally:
        engine.model.stop()


def _tp_rank(rank: int, world: int, port: int, model_dir: Path, adapter: Path, out: Path) -> None:
    from loraplex.shard.parallel import TensorParallel, init_tensor_parallel

    device = f"cuda:{rank}"
    torch.cuda.set_device(device)  # as the shard's model thread does for its rank
    tp = init_tensor_parallel(rank, world, f"tcp://127.0.0.1:{port}", device) if world > 1 else TensorParallel()
    runner = build_runner(model_dir, dtype=torch.bfloat16, device=device, kv_blocks=64, block_size=4, tp=tp)
    store = AdapterStore(runner.model.full_config, dtype=torch.bfloat16, device=device, tp=tp)
    store.load("a", adapter)
    rows = [store.acquire(["a"], pinned=set())["a"], None, store.acquire(["a"], pinned=set())["a"]]
    tokens = runner.generate_greedy([([3 + i, 9, 4, 7], a) for i, a in enumerate(rows)], 6)
    torch.save(tokens, out / f"tp{rank}-of-{world}.pt")
    if tp.distributed:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")
def test_two_gpus_tensor_parallel_equal_one_gpu(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.servers import free_port

    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=8, target_modules="all-linear")
    _tp_rank(0, 1, 0, tmp_path / "base", tmp_path / "a", tmp_path)
    mp.spawn(_tp_rank, args=(2, free_port(), tmp_path / "base", tmp_path / "a", tmp_path), nprocs=2, join=True)
    one = torch.load(tmp_path / "tp0-of-1.pt", weights_only=True)
    two = torch.load(tmp_path / "tp0-of-2.pt", weights_only=True)
    assert two == torch.load(tmp_path / "tp1-of-2.pt", weights_only=True)
    agree = sum(a == b for x, y in zip(one, two, strict=True) for a, b in zip(x, y, strict=True))
    assert agree >= 0.9 * sum(len(x) for x in one)  # bf16 partial sums meet in another order over two GPUs
