"""``loraplex-shard``: one tensor-parallel rank serving the internal gRPC API on a unix socket or port."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from loraplex.common.flags import fail
from loraplex.common.logs import setup_logging
from loraplex.common.shutdown import SERVER_STOP_GRACE
from loraplex.kernels import cuda
from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.shard.allocator import keep_freed_memory
from loraplex.shard.checkpoint import CheckpointError, resolve_model_dir
from loraplex.shard.config import ModelConfig, ModelConfigError
from loraplex.shard.decode_graph import DecodeGraph
from loraplex.shard.embedded import HUB_ID, EmbeddedModelError, embedded_model_dir
from loraplex.shard.engine import ShardEngine
from loraplex.shard.grammar import shard_grammars
from loraplex.shard.kv_cache import plan_kv_blocks
from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.plan import resolve_backend
from loraplex.shard.lora.roots import AdapterRoots
from loraplex.shard.lora.sources import parse_adapter_specs, resolve_adapter_source
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
from loraplex.shard.parallel import TensorParallel, init_tensor_parallel, rank_device
from loraplex.shard.runner import build_runner, parse_dtype
from loraplex.shard.server import EngineServicer, serve
from loraplex.shard.settings import shard_parser

log = logging.getLogger("loraplex.shard")


def main(argv: list[str] | None = None) -> int:
    args = shard_parser().parse(argv)
    setup_logging(args.json_output)
    keep_freed_memory()  # before the model is built: its activations then reuse freed memory
    if args.max_batch_total_tokens < args.block_size or args.block_size < 1:
        fail("loraplex-shard", "--max-batch-total-tokens must hold at least one --block-size block")
    if args.max_active_adapters < 1 or args.max_cpu_adapters < 0:
        fail("loraplex-shard", "--max-active-adapters must be at least 1 and --max-cpu-adapters at least 0")
    if not 0 <= args.rank < args.num_shard:
        fail("loraplex-shard", f"--rank {args.rank} is not in 0..{args.num_shard - 1}")
    device = rank_device(args.device, args.rank, args.num_shard)
    # Builds the model, preloads adapters and runs every step (one OpenMP team), on this rank's GPU.
    model_thread = ModelThread(device=device)
    lora_check = check_lora_backend(args.lora_backend, device, parse_dtype(args.dtype, device), args.max_lora_rank)
    if lora_check is not None:
        fail("loraplex-shard", lora_check)
    lora_backend = resolve_backend(args.lora_backend, device)
    if lora_backend == "cupy":
        try:  # every kernel compiled before the shard reports healthy, never in the middle of a request
            model_thread.call(cuda.warm_up, device)
        except Exception as exc:
            fail("loraplex-shard", f"--lora-backend cupy: the LoRA kernels do not compile here: {_one_line(exc)}")
    try:
        model_dir = resolve_model_dir(args.model_id) if args.model_id else embedded_model_dir()
        dtype = parse_dtype(args.dtype, device)
        config = ModelConfig.from_dir(model_dir)
        TensorParallel(args.rank, args.num_shard).check(config)  # before waiting for the other ranks
        init = args.init_method or f"tcp://{args.master_addr}:{args.master_port}"
        tp = init_tensor_parallel(args.rank, args.num_shard, init, device)
        runner = model_thread.call(
            build_runner,
            model_dir,
            dtype=dtype,
            device=device,
            kv_blocks=plan_kv_blocks(args.max_batch_total_tokens, args.block_size, device),
            block_size=args.block_size,
            tp=tp,
            prefix_caching=not args.no_prefix_caching,
            lora_backend=lora_backend,
        )
        specs = parse_adapter_specs(args.lora_adapters)
        store = AdapterStore(
            runner.model.full_config,
            dtype=dtype,
            device=device,
            max_rank=args.max_lora_rank,
            tp=tp,
            roots=AdapterRoots.parse(args.adapter_dirs),
            max_active=args.max_active_adapters,
            max_host=max(args.max_cpu_adapters, len(specs) - args.max_active_adapters),
            max_host_bytes=args.max_cpu_adapter_bytes,
            max_device_bytes=args.max_device_adapter_bytes,
            load_timeout=args.adapter_load_timeout,
            on_evict=runner.forget_plan,
            pace=model_thread.between_steps,
        )
        if args.decode_graphs == "on" or (args.decode_graphs == "auto" and device.startswith("cuda")):
            runner.decode_graph = model_thread.call(
                DecodeGraph,
                runner.model,
                runner.cache,
                max_batch=args.decode_graph_max_batch,
                max_len=min(config.max_position_embeddings, args.max_batch_total_tokens),
                slots=args.max_active_adapters,
                max_rank=min(args.max_lora_rank, 16),  # slot memory grows with it; bigger ranks run eagerly
            )
        for name, source in specs:
            try:
                model_thread.call(store.load, name, resolve_adapter_source(source))
            except AdapterError as exc:
                raise AdapterError(exc.kind, f"adapter {name!r}: {exc}") from exc
    except (CheckpointError, ModelConfigError, EmbeddedModelError, AdapterError, ValueError, OSError) as exc:
        fail("loraplex-shard", str(exc))
    info = pb.InfoResponse(
        model_id=args.model_id or HUB_ID,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        block_size=args.block_size,
        num_blocks=runner.cache.allocator.num_blocks,
        vocab_size=config.vocab_size,
        eos_token_ids=list(config.eos_token_ids),
        max_lora_rank=args.max_lora_rank,
        world_size=args.num_shard,
        rank=args.rank,
        max_position_embeddings=config.max_position_embeddings,
        model_dir=str(model_dir),
        max_active_adapters=args.max_active_adapters,
        max_cpu_adapters=store.max_host,
        prefix_caching=runner.prefix is not None,
    )
    try:
        grammars = shard_grammars(model_dir, config.vocab_size, config.eos_token_ids)
        service = ShardEngine(runner, store, model_thread, grammars=grammars)
        server = serve(EngineServicer(service, info), args.listen)
    except OSError as exc:
        fail("loraplex-shard", str(exc))
    log.info(
        "shard ready",
        extra={
            "listen": args.listen,
            "rank": args.rank,
            "model": str(model_dir),
            "adapters": store.ids(),
            "sharded_weight_bytes": runner.model.sharded_weight_bytes,
            "decode_graphs": runner.decode_graph is not None,
            "prefix_caching": runner.prefix is not None,
        },
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # Drain: the router finishes (or drops) the batches it has here; under compose or Kubernetes every
    # process gets SIGTERM at once, and leaving now would fail requests the router is still finishing.
    deadline = time.monotonic() + args.drain_timeout
    while service.stats()[2] and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(grace=SERVER_STOP_GRACE).wait()
    if args.listen.startswith("unix://"):
        Path(args.listen.removeprefix("unix://")).unlink(missing_ok=True)
    return 0


def check_lora_backend(name: str, device: str, dtype: torch.dtype, max_rank: int) -> str | None:
    """What stops ``--lora-backend`` from serving here (one line), or None; nothing is compiled yet."""
    try:
        backend = resolve_backend(name, device)
    except ValueError as exc:
        return str(exc)
    if backend != "cupy":
        return None
    why = cuda.missing()
    if why is not None:
        return f"--lora-backend {name} on {device}: {why} (or choose --lora-backend torch)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"--lora-backend {name}: the CuPy kernels take float16 or bfloat16, not --dtype {dtype} (or torch)"
    if max_rank > cuda.MAX_RANK:
        return f"--lora-backend {name}: the CuPy kernels take ranks <= {cuda.MAX_RANK}, not --max-lora-rank {max_rank}"
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


if __name__ == "__main__":
    sys.exit(main())
