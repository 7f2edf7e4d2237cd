"""The PyTorch LoRA plan (the CPU path): each site's weights stacked per chunk, one ``bmm`` per half."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels.bmm import gather_rows, sgmv_expand, sgmv_shrink
from loraplex.kernels.segments import Segments
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.projections import SITES, Projection


def _rank_bucket(rank: int) -> int:
    """Adapters of similar rank share a group: padding is then under 2x, and groups stay few."""
    return 1 << (rank - 1).bit_length()


@dataclass(frozen=True)
class _Expand:
    b: torch.Tensor  # [num_layers, chunks, rank, out]
    v_cols: slice
    y_cols: slice


@dataclass(frozen=True)
class _Group:
    segs: Segments
    a: torch.Tensor  # [num_layers, chunks, in, sum of ranks of the site's projections]
    expands: tuple[_Expand, ...]


class TorchLoraPlan:
    """LoRA work of one batch, prepared once and reused by every decode step of that batch.

    Stacking copies each adapter's weights once per batch composition; in exchange every layer then
    runs a fixed number of batched matmuls per site, however many distinct adapters the batch holds.
    """

    def __init__(
        self, row_adapters: Sequence[LoraAdapter | None], config: ModelConfig, dtype: torch.dtype | None = None
    ) -> None:
        self.row_adapters = tuple(row_adapters)
        self.dtype = dtype
        self._sites: dict[str, list[_Group]] = {}
        for site, projs in SITES.items():
            offsets = {p.name: p.offset(config) for p in projs}
            self._sites[site] = self._build_site(projs, offsets)

    def _build_site(self, site: tuple[Projection, ...], offsets: dict[str, int]) -> list[_Group]:
        projs = tuple(p.name for p in site)
        buckets: dict[int, dict[int, LoraAdapter]] = {}
        site_rank: dict[int, int] = {}
        for adapter in self.row_adapters:
            if adapter is None:
                continue
            ranks = [adapter.projections[p].rank for p in projs if p in adapter.projections]
            if ranks:
                buckets.setdefault(_rank_bucket(max(ranks)), {})[id(adapter)] = adapter
                site_rank[id(adapter)] = max(ranks)
        groups = []
        for members in buckets.values():
            dense = {key: index for index, key in enumerate(members)}
            # Index tensors where the weights are, so that no op mixes host and device tensors.
            where = next(iter(next(iter(members.values())).projections.values())).b.device
            segs, seg_keys = Segments.from_keys(
                [-1 if a is None else dense.get(id(a), -1) for a in self.row_adapters],
                {dense[k]: site_rank[k] for k in members},
                where,
            )
            chunk_keys = [seg_keys[s] for s in segs.chunk_segments]
            groups.append(self._stack(segs, chunk_keys, list(members.values()), projs, offsets, self.dtype))
        return groups

    @staticmethod
    def _stack(
        segs: Segments,
        chunk_keys: list[int],
        members: list[LoraAdapter],
        projs: tuple[str, ...],
        offsets: dict[str, int],
        dtype: torch.dtype | None,
    ) -> _Group:
        present = [p for p in projs if any(p in m.projections for m in members)]
        sample = {p: next(m.projections[p] for m in members if p in m.projections) for p in present}
        like = next(iter(sample.values())).a
        dtype = dtype or like.dtype
        if len(members) == 1:
            return TorchLoraPlan._views(segs, members[0], present, offsets, dtype)
        ranks = {p: max(m.projections[p].rank for m in members if p in m.projections) for p in present}
        num_layers, in_features = like.shape[:2]
        chunks = segs.num_chunks
        # Every element is written below unless some member lacks a projection or has a smaller rank:
        # only then do the stacks need zeros (filling 100+ MB of zeros is a quarter of a rebuild).
        padded = any(p not in m.projections or m.projections[p].rank < ranks[p] for m in members for p in present)
        alloc = torch.zeros if padded else torch.empty
        a = alloc(num_layers, chunks, in_features, sum(ranks.values()), dtype=dtype, device=like.device)
        bs = {
            p: alloc(num_layers, chunks, ranks[p], sample[p].b.shape[-1], dtype=dtype, device=like.device)
            for p in present
        }
        for chunk, key in enumerate(chunk_keys):
            weights = members[key].projections
            col = 0
            for p in present:
                if p in weights:
                    r = weights[p].rank
                    a[:, chunk, :, col : col + r] = weights[p].a
                    bs[p][:, chunk, :r, :] = weights[p].b
                col += ranks[p]
        expands = []
        col = 0
        for p in present:
            out = sample[p].b.shape[-1]
            expands.append(_Expand(bs[p], slice(col, col + ranks[p]), slice(offsets[p], offsets[p] + out)))
            col += ranks[p]
        return _Group(segs, a, tuple(expands))

    @staticmethod
    def _views(
        segs: Segments, member: LoraAdapter, present: list[str], offsets: dict[str, int], dtype: torch.dtype
    ) -> _Group:
        """A group of one adapter uses that adapter's own tensors, broadcast over its chunks: only the A
        matrices of projections sharing a shrink are copied (a full copy per batch would double the memory
        of every adapter in use)."""
        chunks = segs.num_chunks
        weights = [member.projections[p] for p in present]
        a = torch.cat([w.a.to(dtype) for w in weights], dim=-1) if len(weights) > 1 else weights[0].a.to(dtype)
        expands = []
        col = 0
        for p, w in zip(present, weights, strict=True):
            b = w.b.to(dtype).unsqueeze(1).expand(-1, chunks, -1, -1)
            expands.append(_Expand(b, slice(col, col + w.rank), slice(offsets[p], offsets[p] + b.shape[-1])))
            col += w.rank
        return _Group(segs, a.unsqueeze(1).expand(-1, chunks, -1, -1), tuple(expands))

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` at ``layer`` into the fused base output ``y``."""
        for group in self._sites[site]:
            v = sgmv_shrink(gather_rows(x, group.segs), group.a[layer])
            for ex in group.expands:
                sgmv_expand(y[:, ex.y_cols], v[..., ex.v_cols], ex.b[layer], group.segs)
