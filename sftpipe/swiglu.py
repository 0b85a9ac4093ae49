"""A SwiGLU feed-forward block that keeps less for backward: on a small model in LoRA training the
MLP's intermediate activations are most of a step's memory."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .model import LLAMA_LIKE_MODELS


class SiluMul(torch.autograd.Function):
    """`silu(gate) * up`, keeping only `gate` and `up` for backward: the two stock ops also keep
    `silu(gate)`, one more tensor of the MLP's width."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _lean_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    hidden = SiluMul.apply(gate, up)
    if not (torch.is_grad_enabled() and hidden.requires_grad and hidden.is_contiguous()):
        return self.down_proj(hidden)
    # The trainable LoRA factor of `down_proj` keeps its input, `hidden`, for its weight gradient.
    # `gate` and `up` are kept anyway (by SiluMul), so keep a recipe instead of the tensor and redo
    # the cheap elementwise product in backward.
    storage = hidden.untyped_storage().data_ptr()
    gate, up = gate.detach(), up.detach()

    def pack(saved: torch.Tensor):
        if saved.untyped_storage().data_ptr() != storage:
            return saved
        return saved.size(), saved.stride(), saved.storage_offset()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        return (F.silu(gate) * up).as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(hidden)


def use_lean_swiglu(model: torch.nn.Module) -> int:
    """Give every SwiGLU MLP of a supported architecture the lean forward; returns how many.

    Not for gradient checkpointing, which already drops these activations and whose own
    saved-tensor hooks these would shadow.
    """
    config = model.config
    if getattr(config, "model_type", None) not in LLAMA_LIKE_MODELS or getattr(config, "hidden_act", None) != "silu":
        return 0
    patched = 0
    for module in model.modules():
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_lean_swiglu_forward, module)
            patched += 1
    return patched
