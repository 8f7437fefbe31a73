"""The paged serving engine: batching never changes a request's tokens, preemption is invisible,
the absorbed paged decode equals the expanded forward, and the cache costs exactly what MLA says."""
import numpy as np
import pytest

from mindyouzhi.errors import UserError
from mindyouzhi.models.generation import generate
from mindyouzhi.models.runner import ModelRunner
from mindyouzhi.serve.attention import select_attention
from mindyouzhi.serve.engine import Engine, EngineOptions
from mindyouzhi.serve.kv_pool import NULL_BLOCK, BlockAllocator, KVPool
from mindyouzhi.serve.paged_model import PagedModel
from mindyouzhi.serve.sampling import SamplingParams
from mindyouzhi.serve.scheduler import Scheduler, Sequence
from serve_models import RANK, ROPE, build_serve_models

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(4, 124, n).tolist() for n in (3, 17, 9, 30, 1, 22, 5, 12)]
LENGTHS = [12, 5, 20, 8, 15, 3, 25, 10]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    models = build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")
    return {name: ModelRunner.from_dir(path) for name, path in models.items()}


def greedy(lengths):
    return [SamplingParams(max_new_tokens=n) for n in lengths]


def alone(runner, attention="auto"):
    """Each request run by itself in a fresh engine: the reference for batched runs."""
    engine = Engine(runner, EngineOptions(num_blocks=64, block_size=4, attention=attention))
    return [engine.generate([prompt], params)[0].output_ids for prompt, params in zip(PROMPTS, greedy(LENGTHS))]


@pytest.fixture(scope="module")
def alone_outputs(runners):
    return {name: alone(runners[name]) for name in ("mla", "hybrid")}


@pytest.mark.parametrize("name", ["mla", "hybrid"])
@pytest.mark.parametrize("attention", ["custom", "gather"])
def test_concurrent_requests_produce_what_each_produces_alone(runners, alone_outputs, name, attention):
    engine = Engine(runners[name], EngineOptions(num_blocks=200, block_size=4, attention=attention))
    completions = engine.generate(PROMPTS, greedy(LENGTHS))
    assert [c.output_ids for c in completions] == alone_outputs[name]
    assert engine.stats.max_running == len(PROMPTS) and engine.stats.preemptions == 0
    assert engine.pool.allocator.num_free == engine.pool.allocator.usable_blocks  # every block returned


def test_engine_matches_the_single_sequence_reference(runners, alone_outputs):
    # generation.generate (contiguous cache, PyNative) is slow: two short requests suffice.
    for index in (0, 4):
        expected = generate(runners["mla"], PROMPTS[index], 6)
        assert alone_outputs["mla"][index][:6] == expected


@pytest.mark.parametrize("name", ["mla", "hybrid"])
def test_exhausted_pool_preempts_the_youngest_and_finishes_everything_identically(runners, alone_outputs, name):
    engine = Engine(runners[name], EngineOptions(num_blocks=20, block_size=4))  # 76 slots for ~230 tokens of demand
    completions = engine.generate(PROMPTS, greedy(LENGTHS))
    assert engine.stats.preemptions > 0
    assert [c.output_ids for c in completions] == alone_outputs[name]
    assert all(c.finish_reason == "length" for c in completions)
    assert engine.pool.allocator.num_free == engine.pool.allocator.usable_blocks


def test_reserve_admission_queues_instead_of_preempting(runners, alone_outputs):
    engine = Engine(runners["mla"], EngineOptions(num_blocks=20, block_size=4, admission="reserve"))
    completions = engine.generate(PROMPTS, greedy(LENGTHS))
    assert engine.stats.preemptions == 0
    assert 1 < engine.stats.max_running < len(PROMPTS)
    assert [c.output_ids for c in completions] == alone_outputs["mla"]


@pytest.mark.parametrize("name", ["mla", "hybrid", "gqa"])
@pytest.mark.parametrize("attention", ["custom", "gather"])
def test_absorbed_paged_decode_equals_the_expanded_forward_token_by_token(runners, name, attention):
    runner = runners[name]
    pool = KVPool(runner.config, 40, block_size=4)
    model = PagedModel(runner, pool, select_attention(attention), prefill_chunk=16)
    tokens = RNG.integers(4, 124, 44).tolist()
    blocks = pool.allocator.allocate(11)
    RNG.shuffle(blocks)  # scattered, out-of-order blocks
    start = 21  # prefill in two chunks (16 + 5), then decode one token at a time
    paged = [model.prefill(tokens[:start], blocks)]
    paged += [model.decode([tokens[p]], [p], [blocks])[0] for p in range(start, len(tokens))]
    expanded = runner.logits(np.asarray([tokens]))[0, start - 1:]
    np.testing.assert_allclose(np.stack(paged), expanded, atol=1e-4, rtol=0)


def test_cache_bytes_per_token_are_exactly_latent_plus_rope_for_mla_layers(runners):
    config = runners["gqa"].config
    gqa_layer = 2 * config.num_key_value_heads * config.head_dim * 4
    mla_layer = (RANK + ROPE) * 4
    expected = {"gqa": 2 * gqa_layer, "mla": 2 * mla_layer, "hybrid": mla_layer + gqa_layer}
    for name, per_token in expected.items():
        pool = KVPool(runners[name].config, 10, block_size=4)
        assert pool.bytes_per_token == per_token
        assert pool.total_bytes == 10 * 4 * per_token  # the arrays really are that size
    budget_pool = KVPool.from_budget(runners["mla"].config, 10_000, block_size=4)
    assert budget_pool.total_bytes <= 10_000 < budget_pool.total_bytes + budget_pool.bytes_per_block


def test_seeded_sampling_matches_the_reference_and_ignores_batch_company(runners):
    runner = runners["mla"]
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=5)
    engine = Engine(runner, EngineOptions(num_blocks=100, block_size=4))
    batched = engine.generate(PROMPTS[:4], [params] + greedy([7, 7, 7]))[0].output_ids
    assert batched == generate(runner, PROMPTS[0], 6, temperature=0.9, top_p=0.8, seed=5)
    others = [SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=seed) for seed in range(6, 10)]
    assert any(c.output_ids != batched for c in engine.generate([PROMPTS[0]] * 4, others))  # the seed matters


def test_stop_tokens_and_max_tokens_end_requests(runners, alone_outputs):
    engine = Engine(runners["mla"], EngineOptions(num_blocks=64, block_size=4))
    first = alone_outputs["mla"][1][0]
    stopped, capped = engine.generate([PROMPTS[1], PROMPTS[1]], [
        SamplingParams(max_new_tokens=10, stop_token_ids=(first,)), SamplingParams(max_new_tokens=2)])
    assert (stopped.output_ids, stopped.finish_reason) == ([first], "stop")
    assert (capped.output_ids, capped.finish_reason) == (alone_outputs["mla"][1][:2], "length")


def test_requests_that_can_never_run_are_refused(runners):
    engine = Engine(runners["mla"], EngineOptions(num_blocks=5, block_size=4))  # 16 usable slots
    with pytest.raises(UserError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(UserError, match="token ids"):
        engine.add_request([5, 128], SamplingParams())
    with pytest.raises(UserError, match="KV blocks"):
        engine.add_request([5] * 10, SamplingParams(max_new_tokens=10))
    with pytest.raises(UserError, match="temperature"):
        engine.add_request([5], SamplingParams(temperature=-1.0))
    with pytest.raises(UserError, match="kv-memory"):
        KVPool.from_budget(runners["mla"].config, 100, block_size=4)


def test_abort_frees_the_blocks_of_a_running_request(runners):
    engine = Engine(runners["mla"], EngineOptions(num_blocks=64, block_size=4))
    request = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=50))
    engine.step()
    assert engine.pool.allocator.num_free < engine.pool.allocator.usable_blocks
    engine.abort(request)
    events = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [(request, "abort")]
    assert not engine.has_work() and engine.pool.allocator.num_free == engine.pool.allocator.usable_blocks


# -- the scheduler alone (no model) ---------------------------------------------------------------
def _simulate(scheduler: Scheduler, sequences: list[Sequence], steps: int) -> list[Sequence]:
    """Drive the scheduler as the engine does (one token per decode, prefill caches everything)."""
    preempted = []
    for seq in sequences:
        scheduler.add(seq)
    for _ in range(steps):
        plan = scheduler.schedule()
        preempted += plan.preempted
        owned = [block for seq in scheduler.running for block in seq.block_ids]
        assert NULL_BLOCK not in owned and len(owned) == len(set(owned))  # no block shared or the null block
        for seq in plan.prefill:
            seq.num_cached = seq.num_tokens
            seq.output_ids.append(1)
        for seq in plan.decode:
            seq.num_cached += 1
            seq.output_ids.append(1)
    return preempted


def test_scheduler_preempts_the_youngest_running_sequence():
    scheduler = Scheduler(BlockAllocator(9), block_size=4)  # 8 usable blocks
    old, young = (Sequence(name, [1] * 8, SamplingParams(max_new_tokens=20)) for name in ("old", "young"))
    preempted = _simulate(scheduler, [old, young], steps=12)
    assert preempted and {seq.request_id for seq in preempted} == {"young"}
    assert scheduler.running == [old] and list(scheduler.waiting) == [young]


def test_scheduler_reserve_policy_never_preempts():
    scheduler = Scheduler(BlockAllocator(9), block_size=4, admission="reserve")
    # each needs 5 + 8 - 1 = 12 slots = 3 blocks over its life: two fit the 8 usable blocks
    sequences = [Sequence(str(i), [1] * 5, SamplingParams(max_new_tokens=8)) for i in range(3)]
    assert _simulate(scheduler, sequences, steps=6) == []
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 1


# -- bf16 (the runner's --forward-precision): fused bf16 layer steps, one decode graph ------------------
@pytest.fixture(scope="module")
def bf16_runners(tmp_path_factory):
    from mindyouzhi.ops import bf16

    if bf16.unavailable() is not None and "wrong result" not in bf16.unavailable():
        pytest.skip(f"bf16 kernels unavailable here: {bf16.unavailable()}")
    models = build_serve_models(tmp_path_factory.getbasetemp() / "serve-models")
    return {name: ModelRunner.from_dir(path, precision="bf16") for name, path in models.items()}


@pytest.mark.parametrize("name", ["mla", "hybrid", "gqa"])
@pytest.mark.parametrize("attention", ["custom", "gather"])
def test_bf16_paged_forward_is_the_fp32_forward_up_to_bf16_rounding(runners, bf16_runners, name, attention):
    pool = KVPool(bf16_runners[name].config, 40, block_size=4)
    model = PagedModel(bf16_runners[name], pool, select_attention(attention), prefill_chunk=16)
    assert model.precision == "bf16" and not model.decode_attention.dynamic_shapes
    tokens = RNG.integers(4, 124, 30).tolist()
    blocks = pool.allocator.allocate(8)
    RNG.shuffle(blocks)
    start = 21  # prefill in two chunks (16 + 5), then batched decode of the same sequence twice
    paged = [model.prefill(tokens[:start], blocks)]
    for p in range(start, len(tokens)):
        both = model.decode([tokens[p]] * 2, [p] * 2, [blocks] * 2)  # a batch of two identical rows
        np.testing.assert_array_equal(both[0], both[1])  # rows never mix
        paged.append(both[0])
    expanded = runners[name].logits(np.asarray([tokens]))[0, start - 1:]
    scale = np.abs(expanded).max()
    error = np.abs(np.stack(paged) - expanded)
    assert error.max() < 0.03 * scale and error.max() > 1e-6  # bf16 operands through two layers, no more


@pytest.mark.parametrize("name", ["mla", "hybrid"])
def test_bf16_greedy_is_fp32_greedy_except_at_near_ties(runners, bf16_runners, alone_outputs, name):
    engine = Engine(bf16_runners[name], EngineOptions(num_blocks=200, block_size=4))
    batched = [c.output_ids for c in engine.generate(PROMPTS, greedy(LENGTHS))]
    alone_bf16 = [Engine(bf16_runners[name], EngineOptions(num_blocks=64, block_size=4)).generate([p], [g])[0].output_ids
                  for p, g in zip(PROMPTS[:3], greedy(LENGTHS[:3]))]
    assert batched[:3] == alone_bf16  # batching never changes a bf16 request's tokens either
    agreed = 0
    for prompt, low, exact in zip(PROMPTS, batched, alone_outputs[name]):
        same = next((i for i, (a, b) in enumerate(zip(low, exact)) if a != b), len(exact))
        agreed += same
        if same < len(exact):  # the first divergence must be a near-tie of the fp32 model
            logits = runners[name].logits(np.asarray([prompt + exact[:same]]))[0, -1]
            margin = logits[exact[same]] - logits[low[same]]
            assert 0 <= margin < 0.02 * np.abs(logits).max(), (prompt, same, margin)
    assert agreed >= 0.8 * sum(LENGTHS)


def test_runner_greedy_generate_runs_the_engine_and_gives_the_reference_tokens(runners):
    runner = runners["hybrid"]
    expected = generate(runner, PROMPTS[1], 6)
    assert runner.greedy_generate(PROMPTS[1], 6) == expected
    stop = expected[2]
    assert runner.greedy_generate(PROMPTS[1], 6, (stop,)) == expected[:expected.index(stop) + 1]
