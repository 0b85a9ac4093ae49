"""The pieces of a training step that replace transformers' own (sftpipe.rmsnorm, sftpipe.rotary,
sftpipe.attention's per-example split and eager attention): the stock outputs and gradients, less kept
for backward, and in the graph of the training stage's own loss."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import job

from sftpipe.model import load_model
from sftpipe.rmsnorm import use_fused_rmsnorm
from sftpipe.rotary import use_fused_rotary
from sftpipe.train import LoraRecipe, TrainSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _body(model_dir, precision: str, fused: bool):
    model = load_model(model_dir, dtype=DTYPES[precision])
    if fused:
        assert use_fused_rmsnorm(model) == 2 * model.config.num_hidden_layers + 1
    use_fused_rotary(model, fused)
    return model


def _run(model, ids, precision: str):
    """Output and input-embedding gradient of the decoder stack, as training runs it (autocast in bf16),
    and the nodes of its autograd graph."""
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = model.model(inputs_embeds=embeds).last_hidden_state
    # A fixed random projection of the output: it keeps nothing of the model's for backward.
    projection = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(hidden.dtype)
    loss = (hidden * projection).float().sum()
    nodes = _graph_nodes(loss)
    loss.backward()
    return hidden.detach(), embeds.grad, nodes


def test_fused_rmsnorm_and_rope_give_the_stock_outputs_and_gradients(tiny_model, precision):
    ids = torch.randint(0, 1000, (1, 96), generator=torch.Generator().manual_seed(0))
    stock = _run(_body(tiny_model, precision, False), ids, precision)
    fused = _run(_body(tiny_model, precision, True), ids, precision)
    assert torch.equal(fused[0], stock[0])
    if precision == "bf16":
        assert torch.equal(fused[1], stock[1])
    else:  # autograd groups the norm's two paths into its input's gradient differently
        scale = stock[1].abs().max().item()
        assert (fused[1] - stock[1]).abs().max().item() <= 1e-6 * scale, scale
    assert stock[1].abs().max() > 0


def _kept_for_backward(model, ids) -> list[torch.Tensor]:
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(model, ids, "bf16")
    return kept


def test_the_fused_rmsnorm_keeps_no_fp32_copy_of_the_hidden_states(tiny_model):
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    width = load_model(tiny_model).config.hidden_size

    def fp32_hidden(kept):
        return [t for t in kept if t.dtype == torch.float32 and t.shape[-2:] == (ids.shape[1], width)]

    assert fp32_hidden(_kept_for_backward(_body(tiny_model, "bf16", False), ids))  # the control sees the copies
    assert not fp32_hidden(_kept_for_backward(_body(tiny_model, "bf16", True), ids))


def _graph_nodes(tensor: torch.Tensor) -> Counter[str]:
    """How many nodes of each kind the autograd graph of `tensor` holds."""
    seen, names, stack = set(), Counter(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("fused", [True, False])
def test_the_training_loss_runs_through_the_fused_pieces(tiny_model, tokenized, tmp_path, fused):
    """The graph of the loss the training stage computes holds the fused norm, rotation and LoRA layers
    (and the stock ones when they are switched off), and per-example attention splits the packed row."""
    settings = TrainSettings(max_steps=1, batch_size=4, precision="fp32", fused_rmsnorm=fused, fused_rope=fused, fused_lora=fused)
    recipe = LoraRecipe(job(tiny_model, tokenized, tmp_path, settings))
    recipe.setup()
    trainer = recipe.trainer
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    nodes = _graph_nodes(trainer.compute_loss(trainer.model, batch))
    assert ("RMSNormBackward" in nodes) is fused and ("RotaryBackward" in nodes) is fused
    # Every LoRA layer (7 a decoder layer) is one fused step.
    assert nodes["FusedLoraLinearBackward"] == (7 * recipe.model.config.num_hidden_layers if fused else 0)
    assert ("PowBackward0" in nodes) is not fused and ("NegBackward0" in nodes) is not fused
    # Stock RoPE slices; with it fused nothing does, per-example attention included.
    assert "SplitWithSizesBackward0" in nodes and ("SliceBackward0" in nodes) is not fused
    # On CPU `auto` attends eagerly, example by example: a softmax, no sdpa kernel.
    if not torch.cuda.is_available():
        assert "SoftmaxBackward0" in nodes and not any("ScaledDotProduct" in n for n in nodes)


def _weight(tensor: torch.Tensor) -> bool:
    """A parameter, or autocast's bf16 copy of one."""
    node = tensor.grad_fn
    if node is None:  # a leaf: a parameter, or an activation that needs no gradient (the first layer's input)
        return isinstance(tensor, torch.nn.Parameter)
    return type(node).__name__ == "ToCopyBackward0" and type(node.next_functions[0][0]).__name__ == "AccumulateGrad"


def _bf16_step(tiny_model, tokenized, tmp_path, lean_lora: bool):
    """Loss, LoRA factors after it and how many hidden-width bf16 activations (not weights) it kept for
    backward, in one bf16 step of the training stage's own trainer."""
    settings = TrainSettings(max_steps=1, batch_size=4, logging_steps=1, precision="bf16", lean_lora=lean_lora, fused_lora=False)
    recipe = LoraRecipe(job(tiny_model, tokenized, tmp_path / str(lean_lora), settings))
    recipe.setup()
    width = recipe.model.config.hidden_size
    kept = set()

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tensor.shape[-1] == width and not _weight(tensor):
            kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recipe.trainer.train()
    factors = {n: p.detach().clone() for n, p in recipe.trainer.model.named_parameters() if p.requires_grad}
    return recipe.trainer.state.log_history[0]["loss"], factors, len(kept)


def test_lora_layers_share_their_input_under_autocast(tiny_model, tokenized, tmp_path):
    """With `lean_lora`, the LoRA layers that read one input (q, k, v; gate, up) keep that input once
    for backward instead of a bf16 copy each (peft's fp32 cast, autocast's cast back), and learn the same."""
    loss, factors, kept = _bf16_step(tiny_model, tokenized, tmp_path, True)
    stock_loss, stock_factors, stock_kept = _bf16_step(tiny_model, tokenized, tmp_path, False)
    assert loss == stock_loss
    assert factors.keys() == stock_factors.keys()
    for name, factor in stock_factors.items():
        assert torch.equal(factors[name], factor), name
    layers = load_model(tiny_model).config.num_hidden_layers
    assert kept <= stock_kept - 3 * layers, (kept, stock_kept)


def test_eager_per_example_attention_gives_sdpas_outputs_and_gradients(precision, monkeypatch):
    """varlen_eager attends within each example of a packed row as sdpa does, query heads sharing key
    heads included; an example longer than EAGER_MAX_LENGTH goes to sdpa, the others do not."""
    from itertools import accumulate

    from sftpipe import attention

    lengths = [5, 37, 1, attention.EAGER_MAX_LENGTH + 3, 20]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(lengths), 16, generator=generator).to(DTYPES[precision]) for heads in (6, 2, 2))
    grad = torch.randn(1, sum(lengths), 6, 16, generator=generator).to(DTYPES[precision])
    boundaries = torch.tensor([0, *accumulate(lengths)])
    sdpa_lengths, sdpa_causal = [], attention._sdpa_causal

    def counted_sdpa(q, *args):
        sdpa_lengths.append(q.shape[2])
        return sdpa_causal(q, *args)

    def run(causal):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = attention._varlen(causal, None, *inputs, None, scaling=0.3, cu_seq_lens_q=boundaries)
        out.backward(grad)
        return [out.detach().float(), *(t.grad.float() for t in inputs)]

    sdpa = run(attention._sdpa_causal)
    monkeypatch.setattr(attention, "_sdpa_causal", counted_sdpa)
    eager = run(attention._eager_causal)
    assert sdpa_lengths == [attention.EAGER_MAX_LENGTH + 3]
    tolerance = 1e-5 if precision == "fp32" else 3e-2
    for ours, theirs in zip(eager, sdpa, strict=True):
        assert torch.allclose(ours, theirs, atol=tolerance * theirs.abs().max().item(), rtol=0)


def _lora_model(model_dir, precision: str, **lora):
    """The tiny model under peft LoRA on every linear layer, B not zero (so the update counts)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    return get_peft_model(load_model(model_dir, dtype=DTYPES[precision]), config)


def _lora_run(model, ids, precision: str):
    """`_run` on a peft model: output, input-embedding gradient and LoRA factor gradients, and its graph's nodes."""
    hidden, embeds_grad, nodes = _run(model.get_base_model(), ids, precision)
    factors = [p.grad for p in model.parameters() if p.requires_grad]
    return [hidden.float(), embeds_grad.float(), *factors], nodes


def test_fused_lora_gives_peft_outputs_and_gradients(tiny_model, precision):
    """The fused LoRA layer computes what peft's does, forward and backward, every factor's gradient
    included: in fp32 to rounding; in bf16 as close to the fp32 computation (same weights) as peft is."""
    from sftpipe.lora_linear import use_fused_lora

    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    stock, stock_nodes = _lora_run(_lora_model(tiny_model, precision), ids, precision)
    model = _lora_model(tiny_model, precision)
    assert use_fused_lora(model) == 7 * model.config.num_hidden_layers
    fused, nodes = _lora_run(model, ids, precision)
    assert nodes["FusedLoraLinearBackward"] == 7 * model.config.num_hidden_layers
    assert "FusedLoraLinearBackward" not in stock_nodes

    def errors(tensors, truths):
        assert all(truth.abs().max() > 0 for truth in truths)
        return torch.tensor([((t - truth).norm() / truth.norm()).item() for t, truth in zip(tensors, truths, strict=True)])

    if precision == "fp32":
        assert errors(fused, stock).max() <= 1e-5
    else:
        truth, _ = _lora_run(_lora_model(tiny_model, "bf16").float(), ids, "fp32")
        assert errors(fused, truth).mean() <= 1.2 * errors(stock, truth).mean()
        assert errors(fused, stock).max() <= 0.1


@pytest.mark.parametrize("lora", [{"lora_dropout": 0.1}, {"use_dora": True}], ids=["dropout", "dora"])
def test_lora_layers_with_dropout_or_dora_keep_peft_forward(tiny_model, lora):
    from sftpipe.lora_linear import use_fused_lora

    model = _lora_model(tiny_model, "fp32", **lora)
    assert use_fused_lora(model) == 0
    _, nodes = _lora_run(model, torch.arange(16)[None], "fp32")
    assert "FusedLoraLinearBackward" not in nodes


@pytest.mark.parametrize("input_grad", [True, False])
def test_the_fused_lora_layer_computes_an_input_gradient_only_where_one_is_needed(input_grad):
    """The first layers read frozen embeddings: their backward computes the factors' gradients, not the
    input's (two products fewer, as autograd does for peft's layer)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    from sftpipe.lora_linear import use_fused_lora

    class Products(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False)), LoraConfig(r=2, target_modules=["0"]))
    assert use_fused_lora(layer) == 1
    x = torch.randn(4, 16, requires_grad=input_grad)
    out = layer(x)
    with Products() as products:
        out.sum().backward()
    assert products.count == (5 if input_grad else 3)  # (x A) grad, B grad, A grad, then x's: frozen and low-rank
    assert (x.grad is not None) is input_grad
