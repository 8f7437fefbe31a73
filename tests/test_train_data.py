"""SFT rendering (chat template, loss on responses only), text windows, packing and the batch order."""
import json

import numpy as np
import pytest

from hf_fixtures import add_word_tokenizer
from mindyouzhi.errors import UserError
from mindyouzhi.train.data import BatchPlan, collate, pack, text_examples
from mindyouzhi.train.sft import Example, conversation, encode_conversation, read_records, truncate
from test_train_fixtures import add_chat_template


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from mindyouzhi.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tok")
    plain = add_word_tokenizer(root)
    chat_dir = root / "chat"
    chat_dir.mkdir()
    add_word_tokenizer(chat_dir)
    add_chat_template(chat_dir)
    return load_tokenizer(plain), load_tokenizer(chat_dir)


def test_alpaca_history_and_messages_become_conversations():
    record = {"instruction": "q2", "input": "ctx", "output": "a2", "history": [["q1", "a1"]], "system": "s"}
    assert conversation(record, "r") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2\nctx"}, {"role": "assistant", "content": "a2"}]
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert conversation({"messages": messages}, "r") == messages
    assert conversation({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "r") == messages
    with pytest.raises(UserError, match="f.jsonl: line 3: expected 'instruction'/'output'"):
        conversation({"text": "x"}, "f.jsonl: line 3")
    with pytest.raises(UserError, match="must end with an assistant turn"):
        conversation({"messages": messages[:1]}, "r")


def test_loss_covers_every_response_and_nothing_else(tokenizers):
    _, chat = tokenizers
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"},
                {"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6 w7 w8"}]
    example = encode_conversation(chat, messages, "r")
    full = chat.encode(chat.apply_chat_template(messages, add_generation_prompt=False))
    assert example.ids.tolist() == full  # segment-wise tokenization equals the whole rendering here
    # the responses and their end-of-turn "</s>", nothing of the prompts
    assert example.ids[example.loss].tolist() == chat.encode("w3 w4 </s> w6 w7 w8 </s>")
    assert example.prompt_length == len(chat.encode("user w1 w2 </s> assistant"))
    assert not example.loss[: example.prompt_length].any() and example.loss[example.prompt_length]


def test_plain_layout_without_chat_template_ends_with_eos(tokenizers):
    plain, _ = tokenizers
    example = encode_conversation(plain, [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}], "r")
    assert example.ids[example.loss].tolist()[-1] == plain.eos_token_id
    assert example.loss.sum() == 3


def test_records_from_json_array_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "output": "o"}] * 2))
    (tmp_path / "b.jsonl").write_text('{"instruction": "i", "output": "o"}\n\n{"instruction": "j", "output": "p"}\n')
    assert [w for w, _ in read_records(tmp_path / "a.json")] == [f"{tmp_path / 'a.json'}: record 0",
                                                                  f"{tmp_path / 'a.json'}: record 1"]
    assert len(list(read_records(tmp_path / "b.jsonl"))) == 2
    (tmp_path / "bad.jsonl").write_text('{"instruction": "i"\n')
    with pytest.raises(UserError, match="bad.jsonl: line 1: invalid JSON"):
        list(read_records(tmp_path / "bad.jsonl"))


def test_text_windows_and_packing(tokenizers, tmp_path):
    plain, _ = tokenizers
    path = tmp_path / "t.txt"
    path.write_text(" ".join(f"w{i % 100}" for i in range(70)))
    windows = text_examples(plain, path, 16, None, 0)
    assert len(windows) == 4 and all(len(w.ids) == 16 and w.loss_tokens == 15 for w in windows)
    short = [encode_conversation(plain, [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}], "r")
             for _ in range(5)]
    packed = pack(short, 32)
    assert sum(len(p.ids) for p in packed) == sum(len(s.ids) for s in short)
    assert all(len(p.ids) <= 32 for p in packed) and len(packed) < len(short)
    batch = collate(packed, 32, pad_id=0)
    assert batch.ids.shape == (len(packed), 32)
    assert batch.mask.sum() == sum(s.loss_tokens for s in short)


def test_batch_order_is_seeded_and_shards_match_accumulation():
    plan = BatchPlan(num_examples=37, global_batch=8, epochs=2, max_steps=-1, seed=5, shuffle=True)
    assert plan.steps_per_epoch == 4 and plan.total_steps == 8
    again = BatchPlan(37, 8, 2, -1, 5, True)
    assert all((plan.global_indices(s) == again.global_indices(s)).all() for s in range(8))
    first_epoch = np.concatenate([plan.global_indices(s) for s in range(4)])
    assert len(set(first_epoch.tolist())) == 32  # no repeats inside an epoch
    assert not (plan.global_indices(0) == plan.global_indices(4)).all()  # a new permutation per epoch
    # two ranks × 2 micro-batches of 2 read the rows a single process with 4 micro-batches reads
    two_ranks = [mb.tolist() for rank in range(2) for mb in plan.micro_batches(3, rank, 2, 2)]
    single = [mb.tolist() for mb in plan.micro_batches(3, 0, 1, 2)]
    assert two_ranks == single
    with pytest.raises(UserError, match="fewer than one global batch of 64"):
        BatchPlan(37, 64, 1, -1, 0, True, "recipe r.yaml")


def test_truncate_keeps_the_response_of_a_long_prompt():
    def example(prompt, response):
        ids = np.arange(prompt + response, dtype=np.int32)
        return Example(ids, np.arange(prompt + response) >= prompt, prompt)

    short = truncate(example(10, 50), 32)  # prompt fits: the response loses its end
    assert short.ids.tolist() == list(range(32)) and short.prompt_length == 10
    long_both = truncate(example(100, 60), 32)  # half the window for the response, prompt cut in the middle
    assert long_both.ids.tolist() == list(range(4)) + list(range(88, 100)) + list(range(100, 116))
    assert long_both.prompt_length == 16 and long_both.loss.tolist() == [False] * 16 + [True] * 16
    long_prompt = truncate(example(100, 5), 32)  # a short response is kept whole
    assert long_prompt.ids.tolist()[-5:] == list(range(100, 105)) and long_prompt.prompt_length == 27
    assert long_prompt.ids.tolist()[:6] == list(range(6)) and long_prompt.ids[6] == 100 - 21
    assert truncate(example(20, 0), 32) is None  # nothing to learn: dropped
    untouched = example(5, 5)
    assert truncate(untouched, 32) is untouched
