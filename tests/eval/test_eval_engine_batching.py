"""Batched generation for generation benchmarks goes through the paged serving engine and gives
exactly the tokens of one-at-a-time greedy decoding (a real tiny model, not a fake)."""
from hf_fixtures import tiny_convertible
from mindyouzhi.eval.lm import generate_text, generate_texts
from mindyouzhi.models.runner import ModelRunner


def test_engine_batches_equal_sequential_greedy(tmp_path):
    runner = ModelRunner.from_dir(tiny_convertible(tmp_path, "llama", layers=2))
    prompts = ["w1 w2 w3", "w5", "w9 w8 w7 w6 w5 w4", "w20 w21 w22"]
    stops = [(), ("w7",), (), ()]
    sequential = [generate_text(runner, prompt, 6, stop) for prompt, stop in zip(prompts, stops)]
    batched = generate_texts(runner, prompts, 6, stops, batch_size=3)
    assert [g.text for g in batched] == [g.text for g in sequential]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in sequential]
    assert all(g.new_tokens > 0 for g in batched)
