"""The one model file: Llama, Mistral and Qwen2 are the same network, driven by ``ModelConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplex.shard.attention import AttentionInput, attention
from loraplex.shard.checkpoint import TensorReader
from loraplex.shard.config import ModelConfig
from loraplex.shard.kv_cache import KVCache
from loraplex.shard.layers import Rotary, apply_rotary, rms_norm
from loraplex.shard.lora.plan import LoraPlan
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.projections import SITES


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v stacked on the output dim: one matmul for all three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None  # Llama's attention_bias gives o_proj one; Qwen2's does not
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up stacked on the output dim
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class CausalLM:
    """Weights plus a forward pass over packed tokens; holds no per-request state."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        dtype: torch.dtype,
        tp: TensorParallel | None = None,
        full_config: ModelConfig | None = None,
    ) -> None:
        self.tp = tp or TensorParallel()
        self.config = config  # this rank's shapes (its heads and MLP slice)
        self.full_config = full_config or config  # the whole model's, for adapters and clients
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = dtype
        self.device = embed.device
        self.rotary = Rotary(config, dtype, embed.device)

    @classmethod
    def load(
        cls,
        directory: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        device: str = "cpu",
        tp: TensorParallel | None = None,
    ) -> CausalLM:
        """Read a HF Llama-family checkpoint (safetensors) into the fused layout; each rank reads its slice."""
        tp = tp or TensorParallel()
        local = tp.local_config(config)

        def t(reader: TensorReader, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
            return reader.get_part(name, rows, cols).to(device=device, dtype=dtype)

        def fused(reader: TensorReader, prefix: str, site: str) -> torch.Tensor:
            """The site's projections stacked on the output dim, each cut to this rank's part."""
            parts = [t(reader, f"{prefix}{p.module}.{p.name}.weight", *tp.weight_part(p, config)) for p in SITES[site]]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        def fused_bias(reader: TensorReader, prefix: str, site: str) -> torch.Tensor | None:
            """A column-parallel site's biases, stacked like its weights (None unless every projection has one)."""
            projs = SITES[site]
            names = [f"{prefix}{p.module}.{p.name}.bias" for p in projs]
            if not all(n in reader for n in names):
                return None
            return torch.cat([t(reader, n, tp.weight_part(p, config)[0]) for n, p in zip(names, projs, strict=True)])

        with TensorReader(directory) as reader:
            layers = []
            for i in range(config.num_layers):
                p = f"model.layers.{i}."
                o_bias, down_bias = f"{p}self_attn.o_proj.bias", f"{p}mlp.down_proj.bias"
                layers.append(
                    LayerWeights(
                        input_norm=t(reader, p + "input_layernorm.weight"),
                        qkv=fused(reader, p, "qkv"),
                        qkv_bias=fused_bias(reader, p, "qkv"),
                        o=fused(reader, p, "o"),
                        # A row-parallel bias is added once, by rank 0, before the partial sums meet.
                        o_bias=t(reader, o_bias) if o_bias in reader and tp.rank == 0 else None,
                        post_norm=t(reader, p + "post_attention_layernorm.weight"),
                        gate_up=fused(reader, p, "gate_up"),
                        gate_up_bias=fused_bias(reader, p, "gate_up"),
                        down=fused(reader, p, "down"),
                        down_bias=t(reader, down_bias) if down_bias in reader and tp.rank == 0 else None,
                    )
                )
            embed = t(reader, "model.embed_tokens.weight")
            tied = config.tie_word_embeddings or "lm_head.weight" not in reader
            lm_head = embed if tied else t(reader, "lm_head.weight")
            norm = t(reader, "model.norm.weight")
        return cls(local, embed, layers, norm, lm_head, dtype, tp, config)

    @classmethod
    def random(cls, config: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> CausalLM:
        """Random weights of ``config``'s shapes, made on the device: benchmarks at 7B scale, no download."""
        gen = torch.Generator(device=device).manual_seed(seed)

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        def fused(site: str) -> torch.Tensor:
            projs = SITES[site]
            return w(sum(p.shape(config)[1] for p in projs), projs[0].shape(config)[0])

        h = config.hidden_size
        layers = [
            LayerWeights(
                input_norm=ones(h),
                qkv=fused("qkv"),
                qkv_bias=None,
                o=fused("o"),
                o_bias=None,
                post_norm=ones(h),
                gate_up=fused("gate_up"),
                gate_up_bias=None,
                down=fused("down"),
                down_bias=None,
            )
            for _ in range(config.num_layers)
        ]
        embed = w(config.vocab_size, h)
        return cls(config, embed, layers, ones(h), embed, dtype)

    def to(self, device: torch.device | str) -> CausalLM:
        """The same model with every weight on ``device`` (tied embeddings stay tied)."""
        moved: dict[int, torch.Tensor] = {}

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        layers = [LayerWeights(**{k: mv(v) for k, v in vars(w).items()}) for w in self.layers]  # type: ignore[arg-type]
        embed, norm, lm_head = mv(self.embed), mv(self.norm), mv(self.lm_head)
        assert embed is not None and norm is not None and lm_head is not None
        return CausalLM(self.config, embed, layers, norm, lm_head, self.dtype, self.tp, self.full_config)

    @property
    def weight_bytes(self) -> int:
        seen: dict[int, int] = {}
        for tensor in [self.embed, self.norm, self.lm_head]:
            seen[tensor.data_ptr()] = tensor.nbytes
        for layer in self.layers:
            for tensor in vars(layer).values():
                if tensor is not None:
                    seen[tensor.data_ptr()] = tensor.nbytes
        return sum(seen.values())

    @property
    def sharded_weight_bytes(self) -> int:
        """Bytes of the tensor-parallel weights (q/k/v/o and MLP) this rank holds."""
        return sum(w.qkv.nbytes + w.o.nbytes + w.gate_up.nbytes + w.down.nbytes for w in self.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionInput,
        cache: KVCache,
        lora: LoraPlan | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits of the rows ``logits_rows`` of the packed tokens (all rows when None)."""
        cfg = self.config
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary.tables(meta.positions, meta.max_position)
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            if lora is not None:
                lora.apply("qkv", i, h, qkv)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = apply_rotary(q.reshape(-1, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rotary(k.reshape(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            a = attention(q, k, v.reshape(-1, cfg.num_kv_heads, cfg.head_dim), i, cache, meta)
            o = F.linear(a, w.o, w.o_bias)
            if lora is not None:
                lora.apply("o", i, a, o)
            x = x + self.tp.all_reduce(o)
            h = rms_norm(x, w.post_norm, cfg.rms_norm_eps)
            gate_up = F.linear(h, w.gate_up, w.gate_up_bias)
            if lora is not None:
                lora.apply("gate_up", i, h, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = F.linear(act, w.down, w.down_bias)
            if lora is not None:
                lora.apply("down", i, act, down)
            x = x + self.tp.all_reduce(down)
        if logits_rows is not None:
            x = x[logits_rows]
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()
