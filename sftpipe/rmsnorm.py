"""RMSNorm that keeps its input in the model's precision for backward (`train.fused_rmsnorm`).

transformers' Llama-like RMSNorm upcasts its input to fp32 and computes the norm from that copy,
which autograd keeps for backward: in a bf16 model, twice the bytes of the input, at each of the two
norms of every layer. Here the bf16 input and the per-position scale are kept, and backward upcasts
again. The forward and the backward are the stock ops in the stock order: outputs are bit for bit the
stock ones, and so are the gradients in bf16 and fp16; in fp32 autograd adds the norm's two paths into
its input's gradient in another grouping, a rounding-level difference.
"""

from __future__ import annotations

import types

import torch

from .model import LLAMA_LIKE_MODELS


class RMSNorm(torch.autograd.Function):
    """`weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)` with x upcast to fp32, keeping x (not its fp32 copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        upcast = x.to(torch.float32)
        scale = torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
        normed = _scaled(upcast, scale, x.dtype)
        ctx.save_for_backward(x, weight, scale)
        ctx.weight_grad = weight.requires_grad
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, scale = ctx.saved_tensors
        upcast = x.to(torch.float32)
        # autograd's own derivatives of the forward's ops, in its order: mul, cast, mul, rsqrt, mean, pow.
        grad_normed = (grad * weight).to(torch.float32)
        grad_scale = (grad_normed * upcast).sum(-1, keepdim=True)
        grad_mean = -0.5 * grad_scale * scale.pow(3)
        # The mean's gradient is the same for every element of a position: divided once per position
        # (the same quotient) and multiplied in without expanding it to a tensor of the input's size.
        grad_x = grad_normed * scale + (2.0 * upcast) * (grad_mean / upcast.shape[-1])
        grad_weight = None
        if ctx.weight_grad:
            grad_weight = (grad * _scaled(upcast, scale, x.dtype)).sum_to_size(weight.shape)
        return grad_x.to(x.dtype), grad_weight, None


def _scaled(upcast: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(upcast * scale).to(dtype)` in one pass: the product computed in fp32 and rounded into `dtype`."""
    return torch.mul(upcast, scale, out=torch.empty(upcast.shape, dtype=dtype, device=upcast.device))


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def use_fused_rmsnorm(model: torch.nn.Module) -> int:
    """Give every RMSNorm of a Llama-like model the forward above; returns how many."""
    if getattr(model.config, "model_type", None) not in LLAMA_LIKE_MODELS:
        return 0
    patched = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched
