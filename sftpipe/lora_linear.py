"""A LoRA linear layer computed as one autograd step (`train.fused_lora`).

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as five autograd steps, each a pass
over the layer's output or input (the scaling, the sum; in backward the scaling again and the sum of
the two input gradients), and casts the fp32 factors under autocast on every call. On a small model
these passes, and the Python around 200-odd such layers, cost as much as the rank-r products
themselves. Here the scaling is folded into the rank-r factor B, and both sums happen inside the
matrix products (`addmm_` accumulates into the frozen product's output: y += (x Aᵀ)(s B)ᵀ in forward,
dx += (g s B) A in backward). Same mathematics; the rounding of bf16 differs only where peft rounds
in between (the scaled low-rank update before the sum).
"""

from __future__ import annotations

import functools

import torch


class FusedLoraLinear(torch.autograd.Function):
    """`x Wᵀ (+ bias) + (x Aᵀ)(s B)ᵀ` in `W`'s dtype; gradients for `x`, `A` and `B` (W and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dtype = weight.dtype
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            low_rank = rows @ a.T
            out = rows @ weight.T if bias is None else torch.addmm(bias.to(dtype), rows, weight.T)
            out.addmm_(low_rank, b.T)
        ctx.save_for_backward(rows, weight, a, b, low_rank)
        ctx.scaling, ctx.input_shape, ctx.input_dtype = scaling, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, a, b, low_rank = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        grad_low_rank = grad @ b
        grad_b = (grad.T @ low_rank).float().mul_(ctx.scaling)
        grad_a = (grad_low_rank.T @ rows).float()
        if not ctx.needs_input_grad[0]:  # the first layers' input, from frozen embeddings
            return None, None, None, grad_a, grad_b, None
        grad_x = (grad @ weight).addmm_(grad_low_rank, a)
        return grad_x.view(ctx.input_shape).to(ctx.input_dtype), None, None, grad_a, grad_b, None


def _fusable(layer) -> bool:
    """A layer whose every adapter is plain LoRA over a frozen dense nn.Linear: no dropout, no DoRA or
    other variant, no LoRA bias."""
    base = layer.base_layer
    return (
        type(base) is torch.nn.Linear
        and not getattr(layer, "fan_in_fan_out", False)
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and not layer.lora_variant
        and all(type(d) is torch.nn.Identity for d in layer.lora_dropout.values())
        and all(b.bias is None for b in layer.lora_B.values())
    )


def _forward(layer, stock, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`FusedLoraLinear` where one adapter is active and the base weight is in the compute dtype
    (autocast's, or the input's without autocast); peft's forward otherwise."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    active = layer.active_adapters
    if (
        args
        or kwargs
        or layer.disable_adapters
        or layer.merged
        or len(active) != 1
        or active[0] not in layer.lora_A
        or layer.base_layer.weight.dtype != dtype
    ):
        return stock(x, *args, **kwargs)
    name = active[0]
    base = layer.base_layer
    return FusedLoraLinear.apply(
        x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    )


def use_fused_lora(model: torch.nn.Module) -> int:
    """Give every fusable peft LoRA linear layer of `model` the fused forward; how many got it."""
    from peft.tuners.lora import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear) and _fusable(m)]
    for layer in layers:
        layer.forward = functools.partial(_forward, layer, layer.forward)
    return len(layers)
