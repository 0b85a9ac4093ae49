"""Attention for padding-free training batches, per device (`train.attention`).

A padding-free batch packs its examples into one row; each example must attend only to itself.
- `sdpa`: transformers' own; it isolates the examples with one dense block-diagonal mask over the
  whole packed row, whose cost grows with the square of the row.
- `varlen_sdpa`: one causal sdpa call per example, whose cost grows with the sum of the squares of
  the examples: the fast path on CPU.
- `flash_attention_2`: the flash-attn package's variable-length kernel, which reads the sequence
  boundaries directly: the fast path on CUDA (needs flash-attn and a CUDA GPU).
- `auto`: flash_attention_2 on CUDA where flash-attn is importable, else varlen_sdpa.
Inputs without sequence boundaries (padded batches, generation) take the stock sdpa path.
"""

from __future__ import annotations

import importlib.util

import torch

from .io import PipelineError

ATTENTION = ("auto", "sdpa", "varlen_sdpa", "flash_attention_2")
VARLEN_SDPA = "sftpipe_varlen_sdpa"


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention(choice: str) -> str:
    """The implementation `train.attention` stands for on this machine."""
    if choice not in ATTENTION:
        raise PipelineError(f"config key 'train.attention': '{choice}' is not one of {', '.join(ATTENTION)}")
    if choice == "auto":
        return "flash_attention_2" if flash_attention_available() else "varlen_sdpa"
    if choice == "flash_attention_2" and not flash_attention_available():
        raise PipelineError(
            "config key 'train.attention': flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use 'auto', 'varlen_sdpa' or 'sdpa'"
        )
    return choice


def _varlen_sdpa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, cu_seq_lens_q=None, **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    lengths = cu_seq_lens_q.diff().tolist()
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    # `split`, not slicing: the backward of a split is one concatenation, where each slice's backward
    # writes its gradient into a zeroed tensor of the whole packed row.
    parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped
            )
            for q, k, v in parts
            if q.shape[2]
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def use_attention(model, choice: str) -> str:
    """Give `model` the attention `train.attention` names; return the implementation used."""
    implementation = resolve_attention(choice)
    if implementation == "varlen_sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa)
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
        model.set_attn_implementation(VARLEN_SDPA)
    else:
        model.set_attn_implementation(implementation)
    return implementation
