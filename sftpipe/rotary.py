"""Rotary position embedding as one autograd step (`train.fused_rope`).

transformers applies RoPE as `x * cos + rotate_half(x) * sin`, where `rotate_half` slices `x` in two
halves and concatenates them back: in backward each slice writes its gradient into a zeroed tensor of
the full width, and the negation and the sum of the three paths are passes of their own. The rotation
is linear in `x`, so its gradient is the inverse rotation of the incoming one, computed in one go.
The forward is the same expression, so outputs are bit for bit the stock ones.
"""

from __future__ import annotations

import sys

import torch

from .model import LLAMA_LIKE_MODELS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _unrotate_half(x: torch.Tensor) -> torch.Tensor:
    """The transpose of `_rotate_half`: (a, b) -> (b, -a)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((second, -first), dim=-1)


class Rotary(torch.autograd.Function):
    """`x * cos + rotate_half(x) * sin`, keeping only `cos` and `sin` (shared by every layer) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return (x * cos) + (_rotate_half(x) * sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return grad * cos + _unrotate_half(grad * sin), None, None


def fused_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' `apply_rotary_pos_emb`, signature and outputs, with `Rotary`'s backward."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad:  # never in these models; the stock path stays exact
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
    return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)


def use_fused_rotary(model: torch.nn.Module, fused: bool) -> bool:
    """Make the modeling module of `model`'s architecture apply `fused_rotary` (or, with `fused` false,
    its own function back); True where it applies. The modeling module is shared by every model of the
    architecture in this process, which changes no output: the forward is the same expression."""
    if getattr(model.config, "model_type", None) not in LLAMA_LIKE_MODELS:
        return False
    modeling = next(sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__.endswith("Attention"))
    stock = getattr(modeling, "_stock_apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    modeling._stock_apply_rotary_pos_emb = stock
    modeling.apply_rotary_pos_emb = fused_rotary if fused else stock
    return fused
