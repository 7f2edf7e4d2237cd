"""The seven adaptable projections of a Llama-family layer: the one table the model, TP and LoRA read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from loraplex.shard.config import ModelConfig

Dim = Literal["hidden", "q", "kv", "mlp"]  # hidden size, query heads x head_dim, KV heads x head_dim, MLP width


def features(dim: Dim, config: ModelConfig) -> int:
    """Width of ``dim`` under ``config`` (a rank's local config gives the rank's width)."""
    return {
        "hidden": config.hidden_size,
        "q": config.q_size,
        "kv": config.kv_size,
        "mlp": config.intermediate_size,
    }[dim]


@dataclass(frozen=True)
class Projection:
    """One projection: where it sits in the checkpoint, how tensor parallelism splits it, where LoRA meets it.

    Projections that read the same input share one fused base matmul, their *site*; their outputs sit
    side by side in the site's fused output, in table order.
    """

    name: str  # the checkpoint's: model.layers.<n>.<module>.<name>
    module: Literal["self_attn", "mlp"]
    site: str  # the fused matmul in CausalLM: qkv, o, gate_up or down
    parallel: Literal["column", "row"]  # column: the ranks split its output features; row: its input features
    in_dim: Dim
    out_dim: Dim

    @property
    def split_dim(self) -> Dim:
        """The dimension tensor parallelism divides over the ranks."""
        return self.out_dim if self.parallel == "column" else self.in_dim

    def shape(self, config: ModelConfig) -> tuple[int, int]:
        """(in_features, out_features) under ``config``."""
        return features(self.in_dim, config), features(self.out_dim, config)

    def offset(self, config: ModelConfig) -> int:
        """Column where this projection's output starts in its site's fused output."""
        before = SITES[self.site][: SITES[self.site].index(self)]
        return sum(features(p.out_dim, config) for p in before)


# fmt: off
_TABLE = (
    Projection("q_proj",    "self_attn", "qkv",     "column", "hidden", "q"),
    Projection("k_proj",    "self_attn", "qkv",     "column", "hidden", "kv"),
    Projection("v_proj",    "self_attn", "qkv",     "column", "hidden", "kv"),
    Projection("o_proj",    "self_attn", "o",       "row",    "q",      "hidden"),
    Projection("gate_proj", "mlp",       "gate_up", "column", "hidden", "mlp"),
    Projection("up_proj",   "mlp",       "gate_up", "column", "hidden", "mlp"),
    Projection("down_proj", "mlp",       "down",    "row",    "mlp",    "hidden"),
)
# fmt: on

PROJECTIONS: dict[str, Projection] = {p.name: p for p in _TABLE}
# Sites in the order the model meets them, each with its projections in fused-output order.
SITES: dict[str, tuple[Projection, ...]] = {
    site: tuple(p for p in _TABLE if p.site == site) for site in dict.fromkeys(p.site for p in _TABLE)
}
