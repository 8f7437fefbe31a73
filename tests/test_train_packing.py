"""``train_dataset.packed_attention: isolated``: packed SFT examples attend only to themselves."""
import numpy as np
import pytest
from click.testing import CliRunner

from mindyouzhi.cli import main
from mindyouzhi.train.config import load_recipe
from mindyouzhi.train.data import attention_mask, collate, pack
from mindyouzhi.train.sft import Example
from mindyouzhi.train.trainer import train
from test_train_fixtures import final_weights, log_records, shared_models, write_recipe

LENGTHS = (7, 11, 5)


def _logits(model_dir, ids, mask):
    import mindspore as ms

    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import CausalLM, RopeTables
    from mindyouzhi.models.layers import to_tensor

    config = ModelConfig.from_dir(model_dir)
    net = CausalLM(config, SafetensorsStore(model_dir), where=str(model_dir))
    tables = tuple(to_tensor(t) for t in RopeTables(config)(ids.shape[1]))
    return net(to_tensor(ids, ms.int32), *tables, to_tensor(mask)).asnumpy()


@pytest.mark.parametrize("which, grouped", [("student", False), ("teacher", True)], ids=["mla", "gqa"])
def test_a_packed_example_is_computed_as_if_alone(tmp_path_factory, which, grouped):
    """Block-diagonal mask without a position reset: RoPE scores depend on relative positions only,
    so every example's logits equal those of the example run by itself (MLA and GQA layers)."""
    from mindyouzhi.models.layers import causal_mask

    model = shared_models(tmp_path_factory)[which]
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(4, 120, n).astype(np.int32), np.ones(n, bool), 0) for n in LENGTHS]
    packed, = pack(examples, 32)
    assert packed.segments == LENGTHS
    batch = collate([packed], 32, pad_id=2)
    isolated = _logits(model, batch.ids, attention_mask(batch.segments, grouped))
    shared = _logits(model, batch.ids, causal_mask(32))
    start = 0
    for example in examples:
        alone = _logits(model, example.ids[None], causal_mask(len(example.ids)))[0]
        np.testing.assert_allclose(isolated[0, start:start + len(example.ids)], alone, atol=1e-5)
        start += len(example.ids)
    assert np.abs(shared[0, LENGTHS[0]:sum(LENGTHS)] - isolated[0, LENGTHS[0]:sum(LENGTHS)]).max() > 1e-2


def _sft(tmp_path, models, name, **sections):
    recipe = {"run_mode": "sft", "output_dir": str(tmp_path / name), "model": {"student": str(models["student"])},
              "runner_config": {"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 3}}
    recipe.update(sections)
    recipe["train_dataset"] = {"seq_length": 48, "packing": True, "shuffle": False,
                               "sources": [{"path": str(models["sft"]), "format": "sft"}],
                               **sections.get("train_dataset", {})}
    return write_recipe(tmp_path / f"{name}.yaml", **recipe)


def test_isolated_training_is_the_same_in_both_step_forms_and_differs_from_shared(tmp_path, tmp_path_factory):
    models = shared_models(tmp_path_factory)
    runs = {}
    for name, packed_attention, recompute in (("iso_layerwise", "isolated", True), ("iso_whole", "isolated", False),
                                              ("shared", "shared", True)):
        recipe = _sft(tmp_path, models, name, train_dataset={"packed_attention": packed_attention},
                      recompute_config={"recompute": recompute})
        train(load_recipe(recipe), show_progress=False)
        runs[name] = [r["loss"] for r in log_records(tmp_path / name)]
    np.testing.assert_allclose(runs["iso_whole"], runs["iso_layerwise"], rtol=1e-5)
    want, got = final_weights(tmp_path / "iso_layerwise"), final_weights(tmp_path / "iso_whole")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    assert abs(runs["shared"][0] - runs["iso_layerwise"][0]) > 1e-4


@pytest.mark.parametrize("sections, message", [
    ({"train_dataset": {"packed_attention": "isolated", "packing": False}}, "needs train_dataset.packing: true"),
    ({"run_mode": "gkd", "train_dataset": {"packed_attention": "isolated"}}, "is for SFT"),
])
def test_isolation_is_refused_where_it_cannot_hold(tmp_path, tmp_path_factory, sections, message):
    models = shared_models(tmp_path_factory)
    recipe = _sft(tmp_path, models, "r", model={"student": str(models["student"]), "teacher": str(models["teacher"])},
                  **sections)
    result = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert result.exit_code == 2 and message in result.output, result.output
