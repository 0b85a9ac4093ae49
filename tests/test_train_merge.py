"""Train and merge stages on the tiny model: loss goes down, the adapter is safetensors, merge is exact."""

import json
import logging

import pytest
import torch
from conftest import job, killed_after_first_checkpoint, unavailable

from sftpipe.attention import flash_attention_available
from sftpipe.execution import Execution, planned_allocator
from sftpipe.io import PipelineError
from sftpipe.launch import launch
from sftpipe.merge import merge_adapter
from sftpipe.model import load_model, load_tokenizer
from sftpipe.precision import cpu_has_native_bf16, host_precision, resolve_precision
from sftpipe.train import LoraRecipe, TrainJob, TrainSettings, train_lora


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tokenized):
    out = tmp_path_factory.mktemp("train")
    settings = TrainSettings(
        max_steps=24, batch_size=8, learning_rate=5e-3, eval_steps=12, logging_steps=4, lora_dropout=0.0, precision="fp32"
    )
    summary = train_lora(job(tiny_model, tokenized, out, settings, history="history.json"))
    return out, summary


def test_training_lowers_the_loss_and_writes_a_safetensors_adapter(trained):
    out, summary = trained
    names = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    history = json.loads((out / "history.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    assert any("eval_loss" in h for h in history)
    assert summary.steps == 24
    assert not (out / "work").exists()


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model, trained):
    from peft import PeftModel

    adapter = trained[0] / "adapter"
    merge_adapter(tiny_model, adapter, tmp_path / "merged")
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(tiny_model), adapter).eval()(ids).logits
        merged = load_model(tmp_path / "merged").eval()(ids).logits
        base = load_model(tiny_model).eval()(ids).logits
    assert (merged - expected).abs().max().item() <= 1e-4
    assert (merged - base).abs().max().item() > 1e-3  # the adapter changed something


def test_merge_rejects_unknown_dtype(tmp_path, tiny_model, trained):
    with pytest.raises(PipelineError, match="merge.dtype"):
        merge_adapter(tiny_model, trained[0] / "adapter", tmp_path / "m", dtype="int3")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("flags", "native"),
    [("fpu sse2 avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True), ("avx512_bf16x", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(flags, native):
    assert cpu_has_native_bf16(f"processor\t: 0\nmodel name\t: x avx512_bf16 in a name\nflags\t\t: {flags}\n") is native


@pytest.mark.host_precision
def test_auto_precision_follows_the_hardware():
    import re
    from pathlib import Path

    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        flags = re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        expected = "bf16" if any({"avx512_bf16", "amx_bf16"} & set(f.split()) for f in flags) else "fp32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(PipelineError, match="train.precision.*'fp8' is not one of"):
        resolve_precision("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="train.precision"):
            resolve_precision("fp16")
        # Both kinds of CPU, whichever this host is.
        assert host_precision("flags\t\t: sse2 avx2 fma\n") == "fp32"
        assert host_precision("flags\t\t: avx2 avx512f avx512_bf16\n") == "bf16"


def test_the_test_suite_pins_precision():
    # Outside tests marked host_precision, `auto` fails the test instead of resolving from this CPU.
    with pytest.raises(pytest.fail.Exception, match="a test left train.precision at 'auto'"):
        resolve_precision("auto")


def _adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


def _train_adapter(tmp_path, tiny_model, tokenized, **adapter):
    settings = TrainSettings(
        max_steps=16, batch_size=8, learning_rate=5e-3, eval_steps=16, logging_steps=4, precision="fp32", **adapter
    )
    train_lora(job(tiny_model, tokenized, tmp_path, settings))
    history = json.loads((tmp_path / "h.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    return tmp_path / "adapter"


def test_dora_trains_magnitude_vectors(tmp_path, tiny_model, tokenized):
    tensors = _adapter_tensors(_train_adapter(tmp_path, tiny_model, tokenized, use_dora=True))
    magnitudes = {k: v for k, v in tensors.items() if "lora_magnitude_vector" in k}
    # One magnitude per adapted linear layer (7 per layer, 2 layers), moved away from the base weight's norms.
    assert len(magnitudes) == 14
    base = load_model(tiny_model).state_dict()
    q = next(v for k, v in magnitudes.items() if "layers.0.self_attn.q_proj" in k)
    assert not torch.allclose(q, base["model.layers.0.self_attn.q_proj.weight"].norm(dim=1), atol=1e-6)


def test_rslora_scales_by_alpha_over_the_square_root_of_r(tmp_path, tiny_model, tokenized):
    from peft import PeftModel

    adapter = _train_adapter(tmp_path, tiny_model, tokenized, use_rslora=True, lora_r=16, lora_alpha=32)
    model = PeftModel.from_pretrained(load_model(tiny_model), adapter)
    from peft.tuners.lora import LoraLayer

    scalings = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert len(scalings) == 1 and scalings.pop() == pytest.approx(32 / 16**0.5)  # 8; plain LoRA scales by alpha / r = 2


def test_modules_to_save_trains_a_full_copy_of_the_module(tmp_path, tiny_model, tokenized):
    tensors = _adapter_tensors(_train_adapter(tmp_path, tiny_model, tokenized, modules_to_save=["norm"]))
    [(name, norm)] = [(k, v) for k, v in tensors.items() if k.endswith("model.norm.weight")]
    assert not torch.allclose(norm, load_model(tiny_model).state_dict()["model.norm.weight"]), name


def _losses(history_path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads(history_path.read_text())["log_history"] if "loss" in h}


def test_sigkill_then_rerun_resumes_from_the_last_checkpoint(tmp_path, tiny_model, tokenized, caplog):
    import shutil

    settings = TrainSettings(
        max_steps=80, batch_size=4, learning_rate=1e-3, eval_steps=80, logging_steps=5, save_steps=10, precision="fp32"
    )
    uninterrupted = train_lora(job(tiny_model, tokenized, tmp_path / "uninterrupted", settings))
    run = job(tiny_model, tokenized, tmp_path, settings)
    call = f"from sftpipe.train import TrainJob, train_lora\ntrain_lora(TrainJob.from_json({run.to_json()!r}))\n"
    saved = killed_after_first_checkpoint(call, tmp_path / "work")
    assert not (tmp_path / "adapter").exists()
    # What a kill while saving leaves behind: newer checkpoints without their trainer state, or with it cut short.
    last = next((tmp_path / "work").glob(f"*/checkpoint-{saved}"))
    for step, state in ((saved + 5, None), (saved + 7, b'{"global_step": ')):
        partial = shutil.copytree(last, last.with_name(f"checkpoint-{step}"))
        if state is None:
            (partial / "trainer_state.json").unlink()
        else:
            (partial / "trainer_state.json").write_bytes(state)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sftpipe"):
        summary = train_lora(run)
    assert 10 <= summary.resumed_from_step == saved < 80
    assert sum("its save did not finish" in r.getMessage() for r in caplog.records) == 2
    # The progress counts on from the checkpoint's step, so its ETA is for the steps left.
    assert any(m.startswith("train steps: 80/80 (") for m in caplog.messages)
    # Only a real resume runs just the remaining steps, on the remaining tokens...
    assert summary.steps == 80 and summary.steps_run == 80 - saved
    assert 0 < summary.train_tokens < uninterrupted.train_tokens
    # ...and continues the uninterrupted run exactly: weights, optimizer moments, schedule and data
    # order all restored, so every loss logged after the checkpoint is the uninterrupted run's.
    resumed, reference = _losses(tmp_path / "h.json"), _losses(tmp_path / "uninterrupted" / "h.json")
    after = [step for step in reference if step > saved]
    assert after and [resumed[step] for step in after] == pytest.approx([reference[step] for step in after], abs=2e-4)
    assert sorted(resumed) == sorted(reference)  # the history before the checkpoint came back with it
    assert not (tmp_path / "work").exists()


def test_a_changed_config_does_not_resume_an_old_checkpoint(tmp_path, tiny_model, tokenized):
    from dataclasses import asdict

    from sftpipe.train import run_fingerprint

    def fingerprint(settings, validation=tokenized["validation"]):
        return run_fingerprint(asdict(settings), [tiny_model / "config.json", tokenized["train"], validation])

    base = TrainSettings(max_steps=4)
    assert fingerprint(base) == fingerprint(TrainSettings(max_steps=4))
    assert fingerprint(base) != fingerprint(TrainSettings(max_steps=4, learning_rate=1e-3))
    assert fingerprint(base) != fingerprint(base, validation=tokenized["test"])


def test_merged_model_card_and_generate_command(tmp_path, tiny_model, trained):
    import subprocess
    import sys

    from sftpipe.generate import generate, render_prompt

    out, summary = trained
    merge_adapter(tiny_model, out / "adapter", tmp_path / "merged", history_path=out / "history.json")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "`tiny-random`" in card and f"{summary.steps} steps" in card and "| learning_rate | 0.005 |" in card

    tokenizer = load_tokenizer(tmp_path / "merged")
    assert render_prompt("Hi", "qa", tokenizer) == "### Question:\nHi\n\n### Answer:"
    assert render_prompt("Hi", "chat", tokenizer).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    merged = generate(tmp_path / "merged", ["Repeat: red"], "qa", max_new_tokens=6)
    via_adapter = generate(tiny_model, ["Repeat: red"], "qa", adapter_dir=out / "adapter", max_new_tokens=6)
    assert merged == via_adapter
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftpipe.generate",
            "--model",
            str(tmp_path / "merged"),
            "--template",
            "qa",
            "--max-new-tokens",
            "6",
            "Repeat: red",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cli.stdout.strip() == merged[0].strip()
    bad = subprocess.run(
        [sys.executable, "-m", "sftpipe.generate", "--model", str(tmp_path / "merged"), "--template", "nope", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--template: 'nope'" in bad.stderr


@pytest.mark.parametrize(
    "attention",
    [
        "sdpa",
        "varlen_sdpa",
        "varlen_eager",
        pytest.param(
            "flash_attention_2",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not flash_attention_available(), reason="needs flash-attn")],
        ),
    ],
)
def test_padding_free_batches_keep_examples_isolated(tiny_model, tokenized, attention):
    """The padding-free batch the trainer sees gives each example the loss it has alone: no attention
    crosses from one example into the next, whichever implementation `train.attention` picks."""
    import torch.nn.functional as F
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sftpipe.attention import use_attention
    from sftpipe.io import read_jsonl

    device = "cuda" if attention == "flash_attention_2" else "cpu"
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in list(read_jsonl(tokenized["train"]))[:4]]
    model = load_model(tiny_model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    assert use_attention(model, attention) == attention

    def token_losses(input_ids, labels, **kwargs):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        logits = model(input_ids=input_ids.to(device), use_cache=False, **kwargs).logits
        labels = labels[0, 1:].to(device)
        return F.cross_entropy(logits[0, :-1].float(), labels.clamp(min=0), reduction="none")[labels != -100]

    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        # What the collator gives the model in training: position ids and sequence boundaries. Without
        # the position ids, only per-example attention can keep the examples apart (RoPE scores depend
        # on relative positions only), so the varlen case shows that path is the one taken.
        dropped = ("input_ids", "labels") + (("position_ids",) if attention.startswith("varlen") else ())
        together = token_losses(packed["input_ids"], packed["labels"], **{k: v for k, v in packed.items() if k not in dropped})
        alone = torch.cat([token_losses(torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])) for r in rows])
        model.set_attn_implementation("sdpa")
        leaky = token_losses(packed["input_ids"], packed["labels"])  # one long sequence: attention crosses examples
    assert together.shape == alone.shape
    assert (together - alone).abs().max().item() <= (2e-2 if device == "cuda" else 1e-4)
    assert (leaky - alone).abs().max().item() > 1e-3  # the comparison can see leakage


def test_an_unavailable_attention_names_the_key(tiny_model):
    from sftpipe.attention import use_attention

    with pytest.raises(PipelineError, match="train.attention.*'paged' is not one of"):
        use_attention(load_model(tiny_model), "paged")
    if not flash_attention_available():
        with pytest.raises(PipelineError, match="train.attention.*flash_attention_2 needs a CUDA GPU and the flash-attn package"):
            use_attention(load_model(tiny_model), "flash_attention_2")


def test_data_parallel_ranks_train_one_adapter_on_disjoint_rows(tmp_path, tiny_model, tokenized):
    """Two gloo ranks: each trains on its own half of every batch, and the all-reduced gradients keep
    their adapters identical."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    from sftpipe.io import read_jsonl

    settings = TrainSettings(max_steps=4, batch_size=4, learning_rate=5e-3, eval_steps=4, logging_steps=2, precision="fp32")
    (tmp_path / "job.json").write_text(job(tiny_model, tokenized, tmp_path, settings).to_json())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "ddp_probe.py"),
            str(tmp_path / "job.json"),
            str(tmp_path),
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    train_rows = {tuple(r["input_ids"]) for r in read_jsonl(tokenized["train"])}
    batches = [[[tuple(ids) for ids in batch] for batch in r["batches"] if tuple(batch[0]) in train_rows] for r in ranks]
    # Steps of 4 examples: 2 per rank (4 steps, and the one batch the loader fetches ahead), no row on both ranks.
    assert [len(b) for b in batches] == [5, 5] and all(len(batch) == 2 for b in batches for batch in b)
    seen = [{ids for batch in b for ids in batch} for b in batches]
    assert len(seen[0]) == len(seen[1]) == 10 and not seen[0] & seen[1]
    first, second = ranks[0]["trainable"], ranks[1]["trainable"]
    assert first.keys() == second.keys() and len(first) == 2 * 7 * 2
    for name, weight in first.items():
        assert torch.equal(weight, second[name]), name
    # LoRA B factors start at zero: equal because they trained together, not because they stayed put.
    assert all(weight.abs().sum() > 0 for name, weight in first.items() if "lora_B" in name)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "execution", [Execution(processes=2), Execution(gpus=2)], ids=["train.processes=2", "a job holding 2 gpus"]
)
def test_the_launcher_runs_one_training_process_per_worker(tmp_path, tiny_model, tokenized, execution):
    settings = TrainSettings(max_steps=6, batch_size=4, learning_rate=5e-3, eval_steps=6, logging_steps=2, precision="fp32")
    summary = launch(job(tiny_model, tokenized, tmp_path, settings), execution, threads=2)
    assert summary.world_size == 2 and summary.steps == 6 == summary.steps_run
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "work").exists()


def test_a_batch_that_does_not_split_over_the_processes_names_the_key(tmp_path, tiny_model, tokenized, monkeypatch):
    from sftpipe.train import LoraRecipe

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PipelineError, match="train.batch_size.*6 examples do not split evenly over 4 processes"):
        LoraRecipe(job(tiny_model, tokenized, tmp_path, TrainSettings(batch_size=6, precision="fp32")))


def test_early_stopping_ends_training_when_validation_loss_stalls(tmp_path, tiny_model, tokenized):
    # A zero learning rate leaves the validation loss flat: the first evaluation is the best one.
    settings = TrainSettings(
        max_steps=40, batch_size=4, learning_rate=0.0, eval_steps=4, logging_steps=4, early_stopping_patience=2, precision="fp32"
    )
    summary = train_lora(job(tiny_model, tokenized, tmp_path, settings))
    assert summary.steps == 12
    evals = [h["step"] for h in json.loads((tmp_path / "h.json").read_text())["log_history"] if "eval_loss" in h]
    assert evals[:3] == [4, 8, 12]


@pytest.mark.parametrize("early_stopping", [False, True])
def test_validation_runs_once_per_evaluation_step(tmp_path, tiny_model, tokenized, early_stopping):
    """The Trainer evaluates at the last step; the summary takes that evaluation, not a second pass
    over the validation rows, except where the best checkpoint is reloaded (evaluated once more)."""
    from transformers import TrainerCallback

    evaluations = []

    class Evaluations(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evaluations.append((state.global_step, metrics["eval_loss"]))

    settings = TrainSettings(
        max_steps=3, batch_size=4, learning_rate=5e-3, eval_steps=2, logging_steps=1, precision="fp32",
        early_stopping_patience=5 if early_stopping else None,
    )  # fmt: skip
    recipe = LoraRecipe(job(tiny_model, tokenized, tmp_path, settings))
    recipe.setup()
    recipe.trainer.add_callback(Evaluations())
    summary = recipe.train()
    assert [step for step, _ in evaluations] == [2, 3] + ([3] if early_stopping else [])
    assert summary.eval_loss == evaluations[-1][1]


@pytest.mark.parametrize("allocator, expected", [("auto", "tcmalloc"), ("jemalloc", "jemalloc"), ("system", "system")])
def test_training_runs_on_the_configured_allocator(tmp_path, tiny_model, tokenized, allocators, allocator, expected):
    settings = TrainSettings(max_steps=2, batch_size=8, eval_steps=2, precision="fp32")
    summary = launch(job(tiny_model, tokenized, tmp_path, settings), Execution(allocator=allocator))
    # Read from the training process's own memory map, and written by it to the history.
    assert summary.allocator == expected
    assert json.loads((tmp_path / "h.json").read_text())["summary"]["allocator"] == expected
    assert summary.steps == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_an_allocator_that_is_not_installed_names_the_key(monkeypatch):
    import sftpipe.execution

    monkeypatch.setitem(sftpipe.execution.ALLOCATOR_LIBRARIES, "jemalloc", ("sftpipe-no-such-allocator",))
    with pytest.raises(PipelineError, match=r"config key 'train.allocator': jemalloc is not installed"):
        planned_allocator("jemalloc")


def test_fused_loss_equals_cross_entropy_over_full_logits(tiny_model, monkeypatch):
    import sftpipe.loss
    from sftpipe.loss import linear_cross_entropy

    monkeypatch.setattr(sftpipe.loss, "LOSS_CHUNK_ELEMENTS", 7 * 1000)  # several chunks, one of them short
    weight = load_model(tiny_model).lm_head.weight.detach()
    torch.manual_seed(0)
    hidden = torch.randn(37, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (37,))
    targets[::5] = -100
    fused = linear_cross_entropy(hidden, weight, targets)
    (fused * 0.5).backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(reference_hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    (reference * 0.5).backward()
    assert torch.allclose(fused, reference, rtol=1e-6, atol=1e-4)
    assert torch.allclose(hidden.grad, reference_hidden.grad, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets), reference, rtol=1e-6, atol=1e-4)


def test_fused_loss_under_bf16_autocast_matches_the_autocast_logits_path(tiny_model):
    from sftpipe.loss import linear_cross_entropy

    weight = load_model(tiny_model).lm_head.weight.detach()
    torch.manual_seed(0)
    hidden = torch.randn(23, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (23,))
    reference_hidden = hidden.detach().clone().requires_grad_()
    # As in training under bf16: the projection runs in bf16, the loss in fp32, the gradient comes back fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets)
        logits = reference_hidden @ weight.T
    reference = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    fused.backward()
    reference.backward()
    assert hidden.grad.dtype == torch.float32
    assert torch.allclose(fused, reference, rtol=1e-3)
    assert torch.allclose(hidden.grad, reference_hidden.grad, rtol=0.05, atol=1e-3)


# What one training precision can promise: fp32 keeps ~7 significant digits; bf16 keeps 8 bits of
# mantissa, and the fused and logits paths round the projection in different orders.
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-3}


# Padded batches too: there the projected positions include other rows' prompts, which the loss must skip.
@pytest.mark.parametrize(("precision", "padding_free"), [("fp32", True), ("bf16", True), ("fp32", False)])
def test_training_with_the_fused_loss_matches_full_logits(tmp_path, tiny_model, tokenized, precision, padding_free):
    def losses(out, fused_loss):
        settings = TrainSettings(
            max_steps=3,
            batch_size=8,
            learning_rate=5e-3,
            eval_steps=3,
            logging_steps=1,
            precision=precision,
            fused_loss=fused_loss,
            padding_free=padding_free,
        )
        summary = train_lora(job(tiny_model, tokenized, out, settings))
        assert summary.precision == precision
        history = json.loads((out / "h.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h] + [summary.eval_loss]

    fused, full = losses(tmp_path / "fused", True), losses(tmp_path / "full", False)
    assert len(fused) == 4 and fused == pytest.approx(full, rel=LOSS_TOLERANCE[precision])


def _with_lora(model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # Random LoRA B factors (not zeros) so that every LoRA weight gets a gradient worth comparing.
    return get_peft_model(load_model(model_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _allocated_bytes() -> int:
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # in use from the heap + in mmapped chunks


def test_lean_swiglu_gives_the_stock_gradients_and_keeps_two_activations_less_per_layer(tiny_model):
    from sftpipe.execution import current_allocator
    from sftpipe.swiglu import use_lean_swiglu

    if current_allocator() != "system" or not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        unavailable("measures memory kept through glibc's mallinfo2, in a process on glibc's malloc")
    stock, lean = _with_lora(tiny_model), _with_lora(tiny_model)
    assert use_lean_swiglu(lean) == 2
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    kept, grads = {}, {}
    for name, model in (("stock", stock), ("lean", lean)):
        body = model.get_base_model().model  # the decoder stack: no vocabulary logits to dwarf the MLPs
        with torch.no_grad():
            body(input_ids=ids)  # first-call allocations (rotary tables and the like) out of the way
        before = _allocated_bytes()
        hidden = body(input_ids=ids).last_hidden_state
        kept[name] = _allocated_bytes() - before  # what the forward holds for backward, and its output
        hidden.square().mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["lean"].keys() == grads["stock"].keys() and len(grads["lean"]) == 2 * 7 * 2
    for n, grad in grads["stock"].items():
        assert torch.equal(grads["lean"][n], grad), n
    config = stock.config
    # silu(gate) and the product silu(gate) * up, [tokens, intermediate] each, in every layer.
    dropped = 2 * ids.numel() * config.intermediate_size * 4 * config.num_hidden_layers
    assert kept["stock"] - kept["lean"] >= 0.9 * dropped


def test_lean_swiglu_leaves_other_architectures_alone(tiny_model):
    from sftpipe.swiglu import use_lean_swiglu

    model = load_model(tiny_model)
    model.config.hidden_act = "gelu"
    assert use_lean_swiglu(model) == 0


def test_the_training_log_names_the_allocator_and_why(monkeypatch, caplog):
    import sftpipe.execution
    import sftpipe.train

    monkeypatch.setattr(sftpipe.execution, "current_allocator", lambda: "system")
    monkeypatch.setattr(sftpipe.execution, "ALLOCATOR_LIBRARIES", {"tcmalloc": ("sftpipe-no-such-allocator",)})
    monkeypatch.setattr(sftpipe.train, "train_lora", lambda job: "trained")
    with caplog.at_level(logging.INFO, logger="sftpipe"):
        assert launch(TrainJob(*"abcdef", TrainSettings()), Execution(allocator="auto")) == "trained"
    assert "allocator system: train.allocator: auto, and neither tcmalloc nor jemalloc is installed" in caplog.text


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--model", "{tmp}/missing"], "error: --model: {tmp}/missing is not a directory"),
        (["--model", "{tmp}"], "error: --model: {tmp} has no config.json"),
        (["--model", "{tmp}/model", "--template", "nope"], "error: --template: 'nope' is not one of"),
        (["--model", "{tmp}/model", "--adapter", "{tmp}"], "error: --adapter: {tmp} has no adapter_config.json"),
    ],
    ids=["missing model", "not a model", "unknown template", "not an adapter"],
)
def test_generate_checks_its_arguments_before_loading_weights(tmp_path, monkeypatch, capsys, args, error):
    import sftpipe.generate

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")

    def never(*args, **kwargs):
        raise AssertionError("loaded weights before checking the arguments")

    monkeypatch.setattr(sftpipe.generate, "load_tokenizer", never)
    monkeypatch.setattr(sftpipe.generate, "load_model", never)
    assert sftpipe.generate.main([a.format(tmp=tmp_path) for a in args] + ["Hi"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(error.format(tmp=tmp_path))
