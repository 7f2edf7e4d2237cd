"""Baselines do the same work as the server: the same greedy tokens for the same requests, exactly N each."""

from __future__ import annotations

from loraplex.bench.driver import LoadShape
from loraplex.bench.run import Target, run_baselines, screened_prompts, serve
from loraplex.bench.stats import Summary
from loraplex.bench.workload import BenchRequest, PromptMaker, build_requests
from tests.loraplex.bench.conftest import BenchWorld

NEW = 5


def test_baselines_match_loraplex_token_for_token(world: BenchWorld) -> None:
    target = Target(world.server.url)
    prompts = screened_prompts(target, PromptMaker(world.model_dir), 4, 10, NEW, progress=False)
    adapters: list[str | None] = [world.adapters[0], world.adapters[1], None, world.adapters[2], world.adapters[0]]
    requests = build_requests(prompts, adapters, NEW)
    served = serve(target, requests, LoadShape(concurrency=5), "loraplex", "mixed", progress=False)
    base_requests = [BenchRequest(r.index, r.prompt, None, NEW) for r in requests]
    base_served = serve(target, base_requests, LoadShape(concurrency=5), "loraplex", "base", progress=False)
    # the baselines' results, keyed by system; each carries its own token ids
    from loraplex.bench import baselines

    model = baselines.load_model(world.model_dir, "float32")
    static, _, _ = baselines.run_transformers(model, base_requests, batch_size=2)
    names = baselines.peft_names(adapters)
    peft_model = baselines.wrap_peft(baselines.load_model(world.model_dir, "float32"), world.root, names)
    sequential, _, _ = baselines.run_peft_sequential(peft_model, names, requests)
    mixed, _, _ = baselines.run_peft_mixed(peft_model, names, requests, batch_size=3)

    def tokens(results: list) -> dict[int, list[int]]:  # type: ignore[type-arg]
        return {r.index: r.token_ids for r in results}

    assert all(r.tokens == NEW for r in served.results + base_served.results)  # screened prompts run full length
    assert tokens(static) == tokens(base_served.results)
    assert tokens(sequential) == tokens(served.results)
    assert tokens(mixed) == tokens(served.results)
    assert tokens(served.results) != tokens(base_served.results)  # the adapters did change the output
    for results in (static, sequential, mixed):
        assert all(len(r.token_times) == NEW and r.error == "" for r in results)


def test_run_baselines_summaries(world: BenchWorld) -> None:
    prompts = [PromptMaker(world.model_dir).prompt(8, seed) for seed in range(3)]
    requests = build_requests(prompts, [world.adapters[3], None, world.adapters[4], world.adapters[3]], 4)
    out = run_baselines(
        ["transformers", "peft-sequential", "peft-mixed"], world.model_dir, "float32", world.root, requests, 2, "w"
    )
    assert [s.system for s in out] == ["transformers", "peft-sequential", "peft-mixed"]
    for s in out:
        assert isinstance(s, Summary)
        assert (s.requests, s.failed, s.output_tokens, s.short) == (4, 0, 16, 0)
        assert s.tokens_per_s > 0 and s.ttft_p50 > 0 and s.itl_p50 > 0
