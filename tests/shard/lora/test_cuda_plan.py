"""The CUDA LoRA plan on the CPU: its launches emulated from their real arguments against the PyTorch plan."""

from __future__ import annotations

from pathlib import Path

import torch

from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.cuda_plan import CudaLoraPlan
from loraplex.shard.lora.plan import Backend
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.lora.torch_plan import TorchLoraPlan
from loraplex.shard.projections import SITES
from loraplex.shard.runner import SequenceState, build_runner
from tests.factories import make_adapter, tiny_model
from tests.kernels.emulator import kernels_on_cpu


def test_cuda_plan_launches_emulated_from_their_arguments_match_the_torch_plan(tmp_path: Path) -> None:
    # The launch function is replaced by a numpy double that reads the very pointers, leading dimensions
    # and scalars the plan passes (tests/kernels/emulator.py): the CUDA plan's segments, per-layer pointers
    # and output columns are checked here on the CPU; on a GPU, tests/kernels checks the kernels themselves.
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=8, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=3, target_modules=["q_proj", "v_proj", "down_proj"])
    runner = build_runner(tmp_path / "base", kv_blocks=8, block_size=4)
    config = runner.model.config
    store = AdapterStore(config, dtype=torch.bfloat16)

    # As on the device: each site's A^T fused and contiguous, every ``a`` a view of it.
    a, b = (store.load(n, tmp_path / n).with_site_shrinks() for n in "ab")
    rows: list[LoraAdapter | None] = [a, None, b, a]
    with kernels_on_cpu() as emulator:
        kernels_plan = CudaLoraPlan(rows, config, torch.device("cpu"))
        torch_plan = TorchLoraPlan(rows, config, torch.float32)
        torch.manual_seed(0)
        for site, projs in SITES.items():
            x = torch.randn(len(rows), projs[0].shape(config)[0]).bfloat16()
            y = torch.randn(len(rows), sum(p.shape(config)[1] for p in projs)).bfloat16()
            got, want = y.clone(), y.float()
            kernels_plan.apply(site, 1, x, got)
            torch_plan.apply(site, 1, x.float(), want)
            delta = (want - y.float()).norm()
            assert float((got.float() - want).norm() / delta) < 2e-2, site
            assert torch.equal(got[1], y[1]) and not torch.equal(got[0], y[0])
    # One shrink per site; an expand per projection and column: q (0, 0), k (8), v (16; 3), o, gate (0) and
    # up (8), down (0, 0). Fourteen before q, k, v (and gate, up) shared their shrink.
    assert len(emulator.launches) == kernels_plan.launches_per_layer == 12
    # One adapter of one rank everywhere: q, k and v (gate and up) at one column each, 4 + 2 + 3 + 2.
    assert CudaLoraPlan([a, None, a], config, torch.device("cpu")).launches_per_layer == 11


def test_a_model_run_through_the_emulated_kernels_equals_the_torch_plan(tmp_path: Path) -> None:
    # The runner's own prefill and decode, with mixed ranks and targets, the CUDA plan's ops launching the
    # emulated kernels; the PyTorch plan in float32 is the oracle.
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=8, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=3, target_modules=["q_proj", "v_proj", "down_proj"])
    make_adapter(base, tmp_path / "c", seed=2, r=16, target_modules=["k_proj", "up_proj"])
    runner = build_runner(tmp_path / "base", dtype=torch.bfloat16, kv_blocks=64, block_size=4)
    store = AdapterStore(runner.model.full_config, dtype=torch.bfloat16)
    adapters = {n: store.load(n, tmp_path / n).with_site_shrinks() for n in "abc"}
    rows = [adapters["a"], None, adapters["b"], adapters["c"], adapters["a"]]

    def logits(backend: Backend) -> torch.Tensor:
        runner.lora_backend = backend
        runner.forget_plan()
        runner.decode_lora_dtype = runner.prefill_lora_dtype = None if backend == "cupy" else torch.float32
        seqs = [SequenceState(i, [3 + i, 7, 11, 2 * i + 1, 5][: 3 + i % 3], a) for i, a in enumerate(rows)]
        out = [runner.prefill(seqs)]
        for step in range(2):
            for s in seqs:
                s.token_ids.append(5 + step)
            out.append(runner.decode(seqs))
        for s in seqs:
            runner.release(s)
        return torch.cat(out).float()

    with kernels_on_cpu() as emulator:
        kernels = logits("cupy")
    assert emulator.launches  # the kernels ran, not the reference
    torch_plan = logits("torch")
    assert float((kernels - torch_plan).norm() / torch_plan.norm()) < 2e-2
    rows[:] = [None] * len(rows)
    base_only = logits("torch")
    assert float((base_only - torch_plan).norm() / torch_plan.norm()) > 1e-2  # the adapters change the logits
