"""Attention for padding-free training batches, per device (`train.attention`).

A padding-free batch packs its examples into one row; each example must attend only to itself.
- `sdpa`: transformers' own; it isolates the examples with one dense block-diagonal mask over the
  whole packed row, whose cost grows with the square of the row.
- `varlen_sdpa`: one causal sdpa call per example, whose cost grows with the sum of the squares of
  the examples.
- `varlen_eager`: one causal attention per example written as its two products and a softmax in the
  inputs' precision (what transformers calls eager), keeping the example's probabilities for
  backward: on CPU sdpa's flash kernel computes in tiles, and at these lengths its backward is several
  times slower than the three plain ops' (`bench/train_throughput.py`). An example longer than
  `EAGER_MAX_LENGTH` takes sdpa, whose memory does not grow with the square of its length.
- `flash_attention_2`: the flash-attn package's variable-length kernel, which reads the sequence
  boundaries directly: the fast path on CUDA (needs flash-attn and a CUDA GPU).
- `auto`: flash_attention_2 on CUDA where flash-attn is importable, varlen_sdpa elsewhere on CUDA,
  varlen_eager on CPU.
Inputs without sequence boundaries (padded batches, generation) take the stock sdpa path.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from .io import PipelineError

ATTENTION = ("auto", "sdpa", "varlen_sdpa", "varlen_eager", "flash_attention_2")
# The per-example implementations, by the name transformers knows each under.
VARLEN = {"varlen_sdpa": "sftpipe_varlen_sdpa", "varlen_eager": "sftpipe_varlen_eager"}
# The longest example varlen_eager computes eagerly: it keeps heads x length² probabilities for
# backward (at 512 tokens and 9 heads, 4.5 MB per layer in bf16).
EAGER_MAX_LENGTH = 512


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention(choice: str) -> str:
    """The implementation `train.attention` stands for on this machine."""
    if choice not in ATTENTION:
        raise PipelineError(f"config key 'train.attention': '{choice}' is not one of {', '.join(ATTENTION)}")
    if choice == "auto":
        if not torch.cuda.is_available():
            return "varlen_eager"
        return "flash_attention_2" if flash_attention_available() else "varlen_sdpa"
    if choice == "flash_attention_2" and not flash_attention_available():
        raise PipelineError(
            "config key 'train.attention': flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use 'auto', 'varlen_eager', 'varlen_sdpa' or 'sdpa'"
        )
    return choice


def _sdpa_causal(q, k, v, dropout: float, scaling: float | None) -> torch.Tensor:
    grouped = k.shape[1] != q.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped
    )


@functools.lru_cache(maxsize=16)
def _causal_bias(length: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 where a position may attend, -inf where the key lies in its future: `groups` copies of the
    length x length mask stacked along the queries. A batch's examples have at most batch_size
    lengths, which every layer shares."""
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1).repeat(groups, 1)
    return torch.zeros(future.shape, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


def _eager_causal(q, k, v, dropout: float, scaling: float | None) -> torch.Tensor:
    """softmax(q kᵀ · scale, causal) v for one example, in the inputs' precision: the inputs are already
    what autocast made them, and autocast would compute the softmax in fp32 and keep that copy too.
    The query heads that share a key head are stacked along the sequence, so that the keys and values
    are not repeated for each of them (nor their gradients summed back). The scale and the causal mask
    are applied inside the scores' product (`baddbmm`), not as passes of their own."""
    batch, heads, length, width = q.shape
    if length > EAGER_MAX_LENGTH:
        return _sdpa_causal(q, k, v, dropout, scaling)
    pairs, groups = batch * k.shape[1], heads // k.shape[1]
    stacked = q.reshape(pairs, groups * length, width)
    bias = _causal_bias(length, groups, q.dtype, q.device)
    scale = scaling if scaling is not None else 1 / math.sqrt(width)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.baddbmm(bias, stacked, k.reshape(pairs, length, width).transpose(1, 2), alpha=scale)
        probs = scores.softmax(-1)
        if dropout:
            probs = torch.nn.functional.dropout(probs, dropout)
        return torch.bmm(probs, v.reshape(pairs, length, width)).view(batch, heads, length, width)


def _varlen(
    causal, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, cu_seq_lens_q=None, **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    lengths = cu_seq_lens_q.diff().tolist()
    # `split`, not slicing: the backward of a split is one concatenation, where each slice's backward
    # writes its gradient into a zeroed tensor of the whole packed row.
    parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    out = torch.cat([causal(q, k, v, dropout, scaling) for q, k, v in parts if q.shape[2]], dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_attention(model, choice: str) -> str:
    """Give `model` the attention `train.attention` names; return the implementation used."""
    implementation = resolve_attention(choice)
    if implementation in VARLEN:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        causal = _eager_causal if implementation == "varlen_eager" else _sdpa_causal
        AttentionInterface.register(VARLEN[implementation], functools.partial(_varlen, causal))
        AttentionMaskInterface.register(VARLEN[implementation], sdpa_mask)
        model.set_attn_implementation(VARLEN[implementation])
    else:
        model.set_attn_implementation(implementation)
    return implementation
