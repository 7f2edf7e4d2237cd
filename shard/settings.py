"""The shard's flags and their environment twins, without torch: the launcher reads them in a long-lived process."""

from __future__ import annotations

from loraplex.common.defaults import MAX_BATCH_TOTAL_TOKENS
from loraplex.common.flags import FlagParser
from loraplex.common.shutdown import add_drain_timeout_flag

DEFAULT_MAX_LORA_RANK = 128


def shard_parser() -> FlagParser:
    p = FlagParser(
        prog="loraplex-shard",
        description="``loraplex-shard``: one tensor-parallel rank serving the internal gRPC API on a unix socket "
        "or port.",
    )
    p.flag("--model-id", default="", help="checkpoint directory or hub id; empty: the embedded SmolLM2")
    p.flag("--lora-adapters", default="", help="adapters to preload: name=/dir, /dir or hub/id[@rev], comma separated")
    p.flag(
        "--listen", env="SHARD_LISTEN", default="unix:///tmp/loraplex-shard-0.sock", help="unix:///path or host:port"
    )
    p.flag("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.flag("--device", default="cpu", help="cpu or cuda[:N]")
    p.flag("--max-batch-total-tokens", type=int, default=MAX_BATCH_TOTAL_TOKENS, help="KV cache size in tokens")
    p.flag("--block-size", env="KV_BLOCK_SIZE", type=int, default=16)
    p.flag(
        "--no-prefix-caching",
        action="store_true",
        help="never reuse the KV blocks of a prompt prefix seen before (on by default, per adapter)",
    )
    p.flag("--max-lora-rank", type=int, default=DEFAULT_MAX_LORA_RANK)
    p.flag(
        "--lora-backend",
        default="auto",
        choices=["auto", "torch", "cupy"],
        help="LoRA ops: cupy (the CUDA kernels; needs loraplex[cuda]), torch (plain PyTorch), auto (cupy on CUDA, "
        "torch elsewhere); never falls back from one to the other",
    )
    p.flag(
        "--decode-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode-only steps as captured CUDA graphs per batch-size bucket (shard/decode_graph.py); auto: on CUDA",
    )
    p.flag(
        "--decode-graph-max-batch",
        type=int,
        default=64,
        help="largest batch a decode graph holds; bigger batches, and adapters above rank 16, run eagerly",
    )
    p.flag(
        "--adapter-dirs",
        default="",
        help="comma list of roots; an adapter id that was not preloaded loads on demand from <root>/<id>",
    )
    p.flag("--max-active-adapters", type=int, default=64, help="adapters resident on the device at once")
    p.flag("--max-cpu-adapters", type=int, default=256, help="adapters kept in host memory")
    p.flag("--max-cpu-adapter-bytes", type=int, default=0, help="bytes of adapter weights loaded at all; 0: no limit")
    p.flag("--max-device-adapter-bytes", type=int, default=0, help="adapter weight bytes on the device; 0: no limit")
    p.flag("--adapter-load-timeout", type=float, default=60.0, help="seconds an adapter load may take before it fails")
    p.flag("--rank", type=int, default=0, help="this process's tensor-parallel rank")
    p.flag("--num-shard", type=int, default=1, help="tensor-parallel degree (number of shard processes)")
    p.flag("--master-addr", default="127.0.0.1", help="where rank 0 listens for the process group")
    p.flag("--master-port", type=int, default=29500)
    p.flag(
        "--init-method",
        default="",
        help="torch.distributed init method, e.g. file:///private/dir/rendezvous (opens no port); "
        "empty: tcp://<--master-addr>:<--master-port>, whose store listens on every interface",
    )
    add_drain_timeout_flag(p, "on SIGTERM, seconds to wait for cached batches to end")
    p.flag("--json-output", action="store_true", help="JSON log lines")
    return p
