"""Base model stage: every source becomes a safetensors directory with a pad token distinct from EOS."""

import json

import pytest
import torch

from sftpipe.io import PipelineError
from sftpipe.model import ModelSource, load_model, load_tokenizer, materialize_base_model


def _assert_safetensors_only(directory):
    names = {p.name for p in directory.iterdir()}
    assert "model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".gguf")) for n in names)


def test_tiny_random_is_saved_as_safetensors_with_distinct_pad(tiny_model):
    _assert_safetensors_only(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    config = json.loads((tiny_model / "generation_config.json").read_text())
    assert config["pad_token_id"] == tokenizer.pad_token_id


def test_local_directory_source_round_trips(tmp_path, tiny_model):
    out = tmp_path / "copy"
    materialize_base_model(ModelSource(str(tiny_model)), out)
    a, b = load_model(tiny_model).state_dict(), load_model(out).state_dict()
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_packaged_gguf_becomes_a_plain_model(tmp_path):
    out = tmp_path / "smollm2"
    info = materialize_base_model(ModelSource("packaged:smollm2-135m-instruct"), out)
    assert info["parameters"] > 130_000_000
    _assert_safetensors_only(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer, model = load_tokenizer(out), load_model(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    answer = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("packaged:gpt-99", "unknown packaged model 'gpt-99'"),
        ("/no/such/dir", "neither a local directory nor"),
    ],
)
def test_bad_source_names_the_config_key(tmp_path, source, message):
    with pytest.raises(PipelineError, match=f"base_model.source.*{message}"):
        materialize_base_model(ModelSource(source), tmp_path / "m")
    assert not (tmp_path / "m").exists()
