"""Train and merge stages on the tiny model: loss goes down, the adapter is safetensors, merge is exact."""

import json

import pytest
import torch

from conftest import write_jsonl
from sftpipe.io import PipelineError
from sftpipe.merge import merge_adapter
from sftpipe.model import load_model
from sftpipe.tokenization import SPLITS, LengthSettings, SplitSettings, tokenize_and_split
from sftpipe.train import TrainSettings, resolve_precision, train_lora


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("tokenized")
    rows = [
        {"id": f"r{i}", "dataset": "t", "prompt": f"Repeat: {w}\n", "completion": f"{w} {w}"}
        for i, w in enumerate(["red", "green", "blue", "cyan", "gold", "gray", "pink", "teal"] * 6)
    ]
    hydrated = write_jsonl(out / "h.jsonl", rows)
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    tokenize_and_split([hydrated], tiny_model, paths, out / "stats.json", LengthSettings(32), SplitSettings(0.2, 0.1, 0))
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tokenized):
    out = tmp_path_factory.mktemp("train")
    settings = TrainSettings(max_steps=24, batch_size=8, learning_rate=5e-3, eval_steps=12, logging_steps=4, lora_dropout=0.0)
    summary = train_lora(tiny_model, tokenized["train"], tokenized["validation"], out / "adapter", out / "history.json", settings, out / "work")
    return out, summary


def test_training_lowers_the_loss_and_writes_a_safetensors_adapter(trained):
    out, summary = trained
    names = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    history = json.loads((out / "history.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    assert any("eval_loss" in h for h in history)
    assert summary["steps"] == 24
    assert not (out / "work").exists()


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model, trained):
    from peft import PeftModel

    adapter = trained[0] / "adapter"
    merge_adapter(tiny_model, adapter, tmp_path / "merged")
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(tiny_model), adapter).eval()(ids).logits
        merged = load_model(tmp_path / "merged").eval()(ids).logits
        base = load_model(tiny_model).eval()(ids).logits
    assert (merged - expected).abs().max().item() <= 1e-4
    assert (merged - base).abs().max().item() > 1e-3  # the adapter changed something


def test_merge_rejects_unknown_dtype(tmp_path, tiny_model, trained):
    with pytest.raises(PipelineError, match="merge.dtype"):
        merge_adapter(tiny_model, trained[0] / "adapter", tmp_path / "m", dtype="int3")
    assert not (tmp_path / "m").exists()


def test_precision_resolution():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in {"bf16", "fp32", "fp16"}
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="train.precision"):
            resolve_precision("fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_precision_is_bf16_or_fp16():
    assert resolve_precision("auto") in {"bf16", "fp16"}
