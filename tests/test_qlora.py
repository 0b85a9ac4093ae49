"""QLoRA for real, on CPU: bitsandbytes' 4-bit NF4 layers under the LoRA factors, training that lowers
the loss with the lean MLP and the fused loss on them, and a merge into the full-precision base."""

import json
import sys
from dataclasses import replace

import pytest
import torch
from conftest import job

from sftpipe.io import PipelineError
from sftpipe.loss import frozen_output_projection
from sftpipe.merge import merge_adapter
from sftpipe.model import load_model
from sftpipe.swiglu import _lean_swiglu_forward
from sftpipe.train import LoraRecipe, TrainSettings, quantization_config, train_lora

QLORA = TrainSettings(
    quantization="qlora", max_steps=16, batch_size=8, learning_rate=5e-3, eval_steps=16, logging_steps=4, precision="fp32"
)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model, tokenized):
    out = tmp_path_factory.mktemp("qlora")
    return out, train_lora(job(tiny_model, tokenized, out, QLORA))


def test_the_base_is_4_bit_nf4_under_the_lean_mlp_and_the_fused_loss(tmp_path, tiny_model, tokenized):
    import bitsandbytes as bnb

    recipe = LoraRecipe(job(tiny_model, tokenized, tmp_path, QLORA))
    recipe.setup_model()
    quantized = {name: m for name, m in recipe.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7  # every linear layer of both decoder layers
    for module in quantized.values():
        assert module.weight.quant_state.quant_type == "nf4" and module.weight.quant_state.nested  # double quantization
        # Two 4-bit weights per stored byte: an eighth of the fp32 layer (quantization constants aside).
        assert module.weight.numel() * module.weight.element_size() * 8 == module.in_features * module.out_features * 4
    assert sum(module.forward.__func__ is _lean_swiglu_forward for module in recipe.model.modules()) == 2
    # The output projection stays a plain fp32 layer, so the fused loss applies.
    assert frozen_output_projection(recipe.model) is not None


def test_qlora_lowers_the_loss(qlora_run):
    out, summary = qlora_run
    losses = [h["loss"] for h in json.loads((out / "h.json").read_text())["log_history"] if "loss" in h]
    assert summary.steps == 16 and losses[-1] < losses[0]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_a_qlora_adapter_merges_into_the_full_precision_base(tmp_path, tiny_model, qlora_run):
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = qlora_run[0] / "adapter"
    merge_adapter(tiny_model, adapter, tmp_path / "merged")
    name = "model.layers.0.mlp.down_proj"
    factors = load_file(adapter / "adapter_model.safetensors")
    a, b = (factors[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    delta = (b @ a) * QLORA.lora_alpha / QLORA.lora_r
    merged = load_model(tmp_path / "merged").state_dict()[f"{name}.weight"]
    base = load_model(tiny_model).state_dict()[f"{name}.weight"]
    assert (merged - (base + delta)).abs().max().item() <= 1e-4
    # Not the 4-bit weights plus the delta: their rounding would have come into the merged model.
    four_bit = AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=quantization_config(QLORA, "fp32"), device_map="cpu"
    )
    layer = four_bit.get_submodule(name)
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert (merged - (dequantized + delta)).abs().max().item() > 1e-3


def test_qlora_without_bitsandbytes_names_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed
    with pytest.raises(PipelineError, match=r"config key 'train.quantization': qlora needs bitsandbytes, which cannot run here"):
        quantization_config(QLORA, "fp32")


@pytest.mark.cuda
def test_qlora_trains_on_cuda(tmp_path, tiny_model, tokenized):
    summary = train_lora(job(tiny_model, tokenized, tmp_path, replace(QLORA, precision="bf16")))
    assert summary.steps == 16 and summary.precision == "bf16"
    assert torch.cuda.max_memory_allocated() > 0
