"""The training loss: cross entropy on completion positions only, fused with the output projection
where the architecture allows it."""

from __future__ import annotations

import torch

from .model import LLAMA_LIKE_MODELS

# Logit elements per chunk of the fused loss: 32 MB in fp32, whatever the vocabulary.
LOSS_CHUNK_ELEMENTS = 1 << 23


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T` against `targets` (-100 ignored), chunk by chunk.

    The loss is a scalar, so its gradient for `hidden` is computed during the forward and kept;
    neither the [positions, vocabulary] logits nor their softmax outlive a chunk. On a small model
    those are the largest tensors of a LoRA step. `weight` is frozen: it gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grad: bool) -> torch.Tensor:
        rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if with_grad else None
        for start in range(0, hidden.shape[0], rows):
            chunk_targets = targets[start : start + rows]
            # The head's precision, as autocast would pick: a norm may hand over fp32 states to a bf16 head.
            logits = hidden[start : start + rows].to(weight.dtype) @ weight.T
            # One pass of exponentials, in fp32 whatever the head's precision. The largest logit's
            # probability is exp(0) / sum, so the log normalizer is that logit minus its log probability.
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            log_norm = logits.amax(dim=-1).float() - probs.amax(dim=-1).log()
            learned = chunk_targets != -100
            picked = chunk_targets.clamp(min=0)
            total += ((log_norm - logits.gather(1, picked[:, None]).squeeze(1).float()) * learned).sum()
            if grad is None:
                continue
            probs[torch.arange(len(picked), device=probs.device), picked] -= 1
            if not learned.all():  # padded batches: other rows' prompt positions
                probs[~learned] = 0
            grad[start : start + rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`LinearCrossEntropy`, which computes the gradient only when one will be asked for (not in evaluation)."""
    return LinearCrossEntropy.apply(hidden, weight, targets, torch.is_grad_enabled() and hidden.requires_grad)


def frozen_output_projection(model) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    """(causal LM, attribute name, lm_head) when the fused loss applies: an architecture whose logits
    are exactly `lm_head(hidden_states)` (no softcapping or scaling after it), with a bias-free,
    frozen (not in `modules_to_save`), unquantized output projection."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (
        getattr(base.config, "model_type", None) not in LLAMA_LIKE_MODELS
        or type(head) is not torch.nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
    ):
        return None
    return base, next(name for name, child in base.named_children() if child is head), head


def completion_loss(model, inputs: dict[str, torch.Tensor], unwrapped, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, projected positions) over the positions whose next token is learned.

    Prompt positions carry label -100 and add nothing to the loss, yet projecting them onto the
    vocabulary dominates a step when prompts are long and answers short: `logits_to_keep` makes the
    model project only the learned positions, while the forward still runs through any DDP wrapper
    (`model`; `unwrapped` is the bare model). With `fused`, where the architecture allows, the
    projection happens chunk by chunk inside the loss (`linear_cross_entropy`).
    """
    labels = inputs["labels"][:, 1:]
    keep = (labels != -100).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    targets = labels[:, keep]
    projection = frozen_output_projection(unwrapped) if fused else None
    if projection is None:
        logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
    else:
        # The forward returns the hidden states at `keep`; the projection happens inside the loss.
        base, name, head = projection
        setattr(base, name, torch.nn.Identity())
        try:
            hidden = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
        finally:
            setattr(base, name, head)
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets.reshape(-1))
    return loss, torch.tensor(targets.numel())
