"""GKD and SFT on tiny models: the loss goes down, GKD is 0 for student = teacher, the logged KL
equals a numpy reference, vocabularies must match, on-policy sampling runs, checkpoints load."""
import json

import numpy as np
import pytest

from hf_fixtures import tiny_convertible
from mindyouzhi.errors import UserError
from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.trainer import train
from test_train_fixtures import shared_models, log_records, write_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def _run(tmp_path, models, **sections):
    sections.setdefault("model", {"student": str(models["student"]), "teacher": str(models["teacher"])})
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", **sections))
    summary = train(recipe, show_progress=False)
    return recipe, summary, log_records(recipe.output_dir)


def _epoch_means(records, steps_per_epoch):
    losses = [r["loss"] for r in records]
    return [float(np.mean(losses[i: i + steps_per_epoch])) for i in range(0, len(losses), steps_per_epoch)]


def test_gkd_loss_is_zero_when_student_is_teacher(tmp_path, models):
    teacher = str(models["teacher"])
    _, _, records = _run(tmp_path, models, model={"student": teacher, "teacher": teacher},
                         train_dataset={"sources": [str(models["text"])]}, runner_config={"max_steps": 1})
    # (only the first step: Adam turns the ~1e-7 round-off gradient into a full-size update)
    assert abs(records[0]["loss"]) < 1e-6 and records[0]["loss_tokens"] == 2 * 31
    assert records[0]["grad_norm"] < 1e-5


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 2.0)])
def test_gkd_loss_equals_numpy_reference(tmp_path, models, beta, temperature):
    from mindyouzhi.models.runner import ModelRunner
    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.train.data import build_dataset, collate
    from mindyouzhi.train.losses import generalized_jsd_numpy

    recipe, _, records = _run(tmp_path, models, train_dataset={"sources": [str(models["sft"])], "shuffle": False},
                              gkd={"beta": beta, "temperature": temperature},
                              runner_config={"max_steps": 1, "gradient_accumulation_steps": 2})
    data = build_dataset(load_tokenizer(models["student"]), recipe.sources, 32, False, "r")
    batch = collate(data.examples[:4], 32, pad_id=2)  # step 0, unshuffled: the first global batch of 4
    teacher = ModelRunner.from_dir(models["teacher"], with_tokenizer=False).logits(batch.ids)
    student = ModelRunner.from_dir(models["student"], with_tokenizer=False).logits(batch.ids)
    reference = generalized_jsd_numpy(student, teacher, batch.mask, beta, temperature)
    assert records[0]["loss"] == pytest.approx(reference, rel=2e-4)
    assert records[0]["loss_tokens"] == int(batch.mask.sum())


def test_gkd_steps_lower_the_loss_and_checkpoints_are_model_dirs(tmp_path, models):
    from mindyouzhi.models.runner import ModelRunner

    recipe, summary, records = _run(
        tmp_path, models,
        train_dataset={"sources": [{"path": str(models["text"]), "max_samples": 8},
                                   {"path": str(models["sft"]), "max_samples": 8}]},
        runner_config={"epochs": 3, "save_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2},
        lr_schedule={"learning_rate": 3.0e-3, "warmup_ratio": 0.05})
    means = _epoch_means(records, 4)
    assert len(records) == 12 and means[-1] < 0.8 * means[0], means
    assert 0 < records[-1]["lr"] < records[-2]["lr"] and records[0]["lr"] > 0  # the last step still updates
    assert all(r["tokens_per_second"] > 0 for r in records)
    out = recipe.output_dir
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000008", "checkpoint-000012"]
    assert (out / "checkpoint-000012" / "optimizer.safetensors").is_file()
    assert json.loads((out / "checkpoint-000008" / "trainer_state.json").read_text())["step"] == 8
    assert (out / "train_curves.png").stat().st_size > 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["mla"]["kv_lora_rank"] == [24, 24]
    assert (out / "final" / "tokenizer.json").is_file()
    runner = ModelRunner.from_dir(out / "final")
    assert runner.logits(np.arange(4, 20)[None]).shape == (1, 16, 128)
    assert summary["final_model"] == str(out / "final")


def test_sft_steps_lower_the_loss_on_responses_only(tmp_path, models):
    _, _, records = _run(tmp_path, models, run_mode="sft", model={"student": str(models["student"])},
                         train_dataset={"sources": [{"path": str(models["sft"]), "max_samples": 16}], "packing": True,
                                        "seq_length": 64},
                         runner_config={"epochs": 6, "batch_size": 2},
                         lr_schedule={"learning_rate": 3.0e-3, "warmup_ratio": 0.01})
    steps_per_epoch = len(records) // 6
    means = _epoch_means(records, steps_per_epoch)
    assert means[-1] < 0.8 * means[0], means


def test_vocabulary_mismatch_is_refused(tmp_path, models):
    other = tiny_convertible(tmp_path / "other", "llama", 1, vocab_size=100)
    with pytest.raises(UserError, match="do not share a vocabulary .*vocab_size 100 vs 128"):
        _run(tmp_path, models, model={"student": str(models["student"]), "teacher": str(other)},
             train_dataset={"sources": [str(models["text"])]})
    assert not (tmp_path / "run" / "final").exists()


def test_on_policy_steps_sample_from_the_student(tmp_path, models):
    _, summary, records = _run(tmp_path, models, train_dataset={"sources": [{"path": str(models["sft"]),
                                                                             "max_samples": 8}]},
                               gkd={"lmbda": 1.0, "max_new_tokens": 3, "generation_temperature": 1.0},
                               runner_config={"max_steps": 1})
    assert [r["on_policy"] for r in records] == [True]
    assert all(0 < r["loss_tokens"] <= 2 * 3 and np.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize("run_mode,trainable", [("gkd", "all"), ("sft", "all"), ("gkd", "attention")])
def test_layerwise_recompute_step_equals_the_whole_graph_step(tmp_path, models, run_mode, trainable):
    from test_train_fixtures import final_weights

    common = dict(run_mode=run_mode, train_dataset={"sources": [{"path": str(models["sft"]), "max_samples": 16}]},
                  runner_config={"max_steps": 3, "gradient_accumulation_steps": 2},
                  optimizer={"weight_decay": 0.01},
                  model={"student": str(models["student"]), "trainable": trainable})
    if run_mode == "gkd":
        common["model"]["teacher"] = str(models["teacher"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, whole = _run(tmp_path / "a", models, **common)
    _, summary, layerwise = _run(tmp_path / "b", models, recompute_config={"recompute": True}, **common)
    np.testing.assert_allclose([r["loss"] for r in layerwise], [r["loss"] for r in whole], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in layerwise], [r["grad_norm"] for r in whole], rtol=1e-4)
    from safetensors.numpy import load_file

    want, got = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    before = load_file(str(models["student"] / "model.safetensors"))
    for name in want:
        # Adam divides by √v: an element whose gradient is ~0 turns a last-bit gradient difference
        # into an O(lr) step, so compare the updates with a bound relative to the largest step
        update = want[name] - before[name]
        bound = 1e-5 + 0.05 * float(np.abs(update).max())
        np.testing.assert_allclose(got[name] - before[name], update, atol=bound, rtol=0, err_msg=name)
    if trainable == "attention":  # everything outside self_attn is the student's original weights
        for name in want:
            frozen = ".self_attn." not in name
            assert np.array_equal(got[name], before[name]) == frozen, name


def test_balancing_keeps_the_first_loss_and_evens_the_factor_scales(tmp_path, models):
    """A fresh run balances the MLA factor pairs (exact: the first step's loss is the unbalanced
    one); what it saves has q_proj and kv_b_proj entries at comparable scales."""
    from safetensors.numpy import load_file

    sections = dict(train_dataset={"sources": [str(models["sft"])], "shuffle": False},
                    runner_config={"max_steps": 1}, lr_schedule={"learning_rate": 1.0e-9})
    runs = {}
    for balance in (False, True):
        (tmp_path / str(balance)).mkdir()
        recipe, _, records = _run(tmp_path / str(balance), models, model={
            "student": str(models["student"]), "teacher": str(models["teacher"]), "balance_mla": balance}, **sections)
        runs[balance] = (records[0]["loss"], load_file(str(recipe.output_dir / "final" / "model.safetensors")))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)

    def ratio(weights):
        q = weights["model.layers.0.self_attn.q_proj.weight"]
        b = weights["model.layers.0.self_attn.kv_b_proj.weight"]
        return float(np.sqrt(np.mean(q ** 2) / np.mean(b ** 2)))

    source = load_file(str(models["student"] / "model.safetensors"))
    assert abs(np.log(ratio(runs[True][1]))) < abs(np.log(ratio(source)))
    assert runs[False][1]["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(
        source["model.layers.0.self_attn.q_proj.weight"], abs=1e-6)


def test_sft_source_loss_all_makes_every_token_a_target(tmp_path, models):
    from mindyouzhi.tokenizer import load_tokenizer
    from mindyouzhi.train.data import build_dataset

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model={"student": str(models["student"]),
                                                                   "teacher": str(models["teacher"])},
                                      train_dataset={"sources": [{"path": str(models["sft"]), "loss": "all"},
                                                                 str(models["sft"])]}))
    data = build_dataset(load_tokenizer(models["student"]), recipe.sources, 32, False, "r")
    every = [e for e in data.examples if e.source == 0]
    answers = [e for e in data.examples if e.source == 1]
    assert all(e.loss[1:].all() and not e.loss[0] for e in every)
    assert all(not e.loss[1:].all() for e in answers)  # the prompt carries no loss
    assert [e.ids.tolist() for e in every] == [e.ids.tolist() for e in answers]
    with pytest.raises(UserError, match=r"sources\[0\]\.loss applies to sft data only"):
        load_recipe(write_recipe(tmp_path / "t.yaml", train_dataset={"sources": [
            {"path": str(models["text"]), "loss": "all"}]}, model={"student": str(models["student"]),
                                                                    "teacher": str(models["teacher"])}))
