"""One model's msprobe dump (run in its own process: msprobe's PrecisionDebugger is a singleton).

    python -m mindyouzhi.probe.dump --model DIR --ids IDS.npy --dump-dir DIR [--layer-inputs NPZ]
                                    [--save-layer-inputs NPZ]

Loads the model as MindSpore Cells (PyNative: msprobe's L0 dump hooks Cells), wraps every
``self_attn`` in a Cell named ``Attention`` so the GQA (teacher) and MLA (student) attention
outputs get the same dump name, and dumps with ``task: tensor``, ``level: L0``, restricted to the
attention and decoder-layer outputs:

* step 0 — *chained*: the model on its own hidden states (errors accumulate over layers);
* step 1 — *isolated* (with ``--layer-inputs``): every decoder layer reads the teacher's input of
  that layer, so each layer's error is its own.

msprobe's statistics call ``mint.norm``, which has no CPU kernel in MindSpore 2.10; it is swapped
for ``ops.norm`` at runtime before msprobe is imported (the environment notes' one-line patch;
site-packages are not edited).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DUMP_LIST = ["self_attn.Attention.forward", "DecoderLayer.forward"]


def patch_mindspore_for_msprobe() -> None:
    import mindspore
    import mindspore.mint as mint

    if getattr(mint, "norm", None) is not mindspore.ops.norm:
        mint.norm = mindspore.ops.norm


def build_model(model_dir: Path):
    from mindspore import nn

    from mindyouzhi.convert_weights.safetensors_io import SafetensorsStore
    from mindyouzhi.models.config import ModelConfig
    from mindyouzhi.models.decoder import CausalLM

    class Attention(nn.Cell):
        """Same class name for GQA and MLA attention, so msprobe matches their dumps."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def construct(self, x, cos, sin, mla_cos, mla_sin, mask):
            return self.inner(x, cos, sin, mla_cos, mla_sin, mask)

    config = ModelConfig.from_dir(model_dir)
    net = CausalLM(config, SafetensorsStore(model_dir), where=str(model_dir))
    for layer in net.model.layers:
        layer.self_attn = Attention(layer.self_attn)
    return config, net


def tables(config, length: int):
    from mindyouzhi.models.decoder import RopeTables
    from mindyouzhi.models.layers import causal_mask, to_tensor

    return tuple(to_tensor(t) for t in RopeTables(config)(length)) + (to_tensor(causal_mask(length)),)


def layer_inputs(net, ids, inputs) -> list:
    x = net.model.embed_tokens(ids)
    out = []
    for layer in net.model.layers:
        out.append(x.asnumpy())
        x = layer(x, *inputs)
    return out


def main() -> None:
    import mindspore as ms

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ids", type=Path, required=True)
    parser.add_argument("--dump-dir", type=Path, required=True)
    parser.add_argument("--layer-inputs", type=Path, default=None, help="teacher layer inputs (isolated step)")
    parser.add_argument("--save-layer-inputs", type=Path, default=None)
    args = parser.parse_args()

    ms.set_device("CPU")
    patch_mindspore_for_msprobe()
    from msprobe.mindspore import PrecisionDebugger

    config, net = build_model(args.model)
    ids_array = np.load(args.ids).astype(np.int32)
    ids = ms.Tensor(ids_array, ms.int32)
    inputs = tables(config, ids_array.shape[1])
    if args.save_layer_inputs:
        np.savez(args.save_layer_inputs, *layer_inputs(net, ids, inputs))

    args.dump_dir.mkdir(parents=True, exist_ok=True)
    config_path = args.dump_dir / "msprobe_config.json"
    config_path.write_text(json.dumps({
        "task": "tensor", "dump_path": str(args.dump_dir), "rank": [], "step": [], "level": "L0",
        "async_dump": False, "tensor": {"scope": [], "list": DUMP_LIST, "data_mode": ["forward"]}}))
    debugger = PrecisionDebugger(config_path=str(config_path))
    debugger.start(model=net)
    net(ids, *inputs)  # step 0: chained
    debugger.stop()
    debugger.step()
    if args.layer_inputs:
        teacher_inputs = np.load(args.layer_inputs)
        debugger.start(model=net)
        for index, layer in enumerate(net.model.layers):  # step 1: isolated
            layer(ms.Tensor(teacher_inputs[f"arr_{index}"]), *inputs)
        debugger.stop()
        debugger.step()


if __name__ == "__main__":
    main()
