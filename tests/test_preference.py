"""Preference tuning on the tiny model: pairs through the data stages (masks from token ids, each reply
plus EOS), reference log-probs computed once and read from their artifact (never recomputed), the
DPO loss going down, held-out rewards; bad pairs named by file, line and field; a beta sweep planning
one reference job."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from workflow import planned_jobs, snakemake

from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
from sftpipe.filters import FilterSettings, filter_and_mix
from sftpipe.io import PipelineError, read_jsonl
from sftpipe.merge import merge_adapter
from sftpipe.model import load_tokenizer
from sftpipe.preference_settings import PreferenceSettings
from sftpipe.preference_train import PreferenceJob, PreferenceRecipe, completion_positions_only
from sftpipe.reference import evaluate_preference, precompute_reference_logps
from sftpipe.splits import SplitSettings, assign_split, row_split
from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split
from sftpipe.train import TrainSettings

BETA = 0.1


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model):
    """The demo's preference pairs through download, hydration with the model's chat template, and
    tokenize-and-split: {split: path}."""
    out = tmp_path_factory.mktemp("pairs")
    spec = DatasetSpec.from_config("pairs", {"preset": "sftpipe_demo_pairs", "limit": 60})
    download_dataset(spec, out / "raw.jsonl", out / "manifest.json", None)
    hydrate_dataset(spec, out / "raw.jsonl", out / "hydrated.jsonl", tiny_model)
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    tokenize_and_split(
        [out / "hydrated.jsonl"], tiny_model, paths, out / "stats.json", LengthSettings(96), SplitSettings(0.2, 0.2)
    )
    return paths


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model, pairs):
    """precision -> the tiny model's reference log-probs of the pairs in that precision, computed once."""
    made = {}

    def reference(precision: str) -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp(f"reference-{precision}")
            precompute_reference_logps(tiny_model, pairs, out / "logps.jsonl", out / "reference.json", precision=precision)
            made[precision] = out / "logps.jsonl"
        return made[precision]

    return reference


@pytest.fixture(scope="module")
def reference(references):
    return references("fp32")


# What the first step's rewards may be, beside 0, when the reference is computed as the trainer
# computes: the two forwards differ only in how their batches are padded and tiled (measured: ~1e-7
# in both precisions). A reference in fp32 under a bf16 policy gives ~3e-5; a merged bf16 model
# under an unmerged adapter ~7e-5.
REWARD_TOLERANCE = {"fp32": 1e-6, "bf16": 2e-6}


def _job(tiny_model, pairs, reference, out, info=None, **train):
    settings = TrainSettings(
        **{"batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1, "eval_steps": 1000, "precision": "fp32", **train}
    )
    return PreferenceJob(
        base_dir=tiny_model,
        train_path=pairs["train"],
        validation_path=pairs["validation"],
        reference_path=reference,
        reference_info_path=info or reference.with_name("reference.json"),
        adapter_dir=out / "adapter",
        history_path=out / "history.json",
        work_dir=out / "work",
        settings=settings,
        preference=PreferenceSettings(beta=BETA),
    )


def test_each_reply_is_masked_as_itself_plus_eos(tiny_model, pairs):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = load_tokenizer(tiny_model)
    rows = [row for split in SPLITS for row in read_jsonl(pairs[split])]
    assert len(rows) == 60
    for row in rows:
        # The base model's chat template renders the prompt, up to where the assistant answers.
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["prompt_ids"] == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for reply in ("chosen", "rejected"):
            assert row[f"{reply}_ids"] == [*tokenizer(row[reply], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    # The trainer learns exactly those ids: its collator's completion mask covers each reply, EOS included.
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows[:4])
    replies = [r["chosen_ids"] for r in rows[:4]] + [r["rejected_ids"] for r in rows[:4]]
    for ids, mask, expected in zip(batch["input_ids"], batch["completion_mask"], replies, strict=True):
        assert ids[mask.bool()].tolist() == expected


def _first_step(job):
    """Train one step; return its logged metrics and how many forwards the model's backbone ran in
    training (a reference forward would run there too, under no_grad, with the adapter disabled)."""
    recipe = PreferenceRecipe(job)
    recipe.setup()
    forwards = []
    model = recipe.trainer.model
    backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    backbone.register_forward_hook(lambda module, *args: forwards.append(module.training))
    recipe.train()
    [logged] = [h for h in recipe.trainer.state.log_history if "loss" in h]
    return logged, forwards.count(True)


def _shifted(reference, path, chosen, rejected):
    rows = [
        {**r, "ref_chosen_logps": r["ref_chosen_logps"] + chosen, "ref_rejected_logps": r["ref_rejected_logps"] + rejected}
        for r in read_jsonl(reference)
    ]
    return write_jsonl(path, rows)


def test_the_reference_is_read_from_its_artifact_and_never_recomputed(tmp_path, tiny_model, pairs, references, precision):
    reference, tolerance = references(precision), REWARD_TOLERANCE[precision]
    train_rows = len(list(read_jsonl(pairs["train"])))
    one_batch = {"max_steps": 1, "batch_size": train_rows, "precision": precision}
    assert json.loads(reference.with_name("reference.json").read_text())["precision"] == precision
    # Unshifted: the untrained policy is its reference, so the artifact holds what the trainer computes itself.
    logged, forwards = _first_step(_job(tiny_model, pairs, reference, tmp_path / "plain", **one_batch))
    assert abs(logged["rewards/chosen"]) < tolerance and abs(logged["rewards/rejected"]) < tolerance
    assert logged["loss"] == pytest.approx(math.log(2), abs=tolerance)
    ref = [r for r in read_jsonl(reference) if r["split"] == "train"]
    assert logged["logps/chosen"] == pytest.approx(sum(r["ref_chosen_logps"] for r in ref) / len(ref), abs=1e-3)
    # One backbone forward per step: the policy's, no reference forward.
    assert forwards == 1
    # Shifted: the rewards and the loss move exactly as the DPO formula says they must.
    shifted = _shifted(reference, tmp_path / "shifted.jsonl", chosen=5.0, rejected=-3.0)
    info = reference.with_name("reference.json")
    logged, forwards = _first_step(_job(tiny_model, pairs, shifted, tmp_path / "shifted", info=info, **one_batch))
    assert logged["rewards/chosen"] == pytest.approx(-BETA * 5.0, abs=tolerance)
    assert logged["rewards/rejected"] == pytest.approx(BETA * 3.0, abs=tolerance)
    assert logged["rewards/margins"] == pytest.approx(-BETA * 8.0, abs=tolerance)
    assert logged["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-BETA * 8.0)).item(), abs=tolerance)
    assert forwards == 1


def test_a_reference_forward_in_the_loss_is_an_error(tmp_path, tiny_model, pairs, reference):
    # TRL's loss runs a reference forward inline whenever it is not told the batch holds the reference.
    recipe = PreferenceRecipe(_job(tiny_model, pairs, reference, tmp_path, max_steps=1))
    recipe.setup()
    recipe.trainer.precompute_ref_logps = False
    with pytest.raises(RuntimeError, match="a reference forward ran"):
        recipe.train()


def test_a_reference_of_another_precision_is_an_error(tmp_path, tiny_model, pairs, reference):
    with pytest.raises(
        PipelineError, match=r"reference.json: the reference log-probs were computed in fp32, but .*trains in bf16"
    ):
        PreferenceRecipe(_job(tiny_model, pairs, reference, tmp_path, precision="bf16"))


def test_the_sft_adapter_kept_training_starts_at_its_reference(tmp_path, tiny_model, pairs, precision):
    from peft import LoraConfig, get_peft_model

    from sftpipe.model import load_model

    # An SFT adapter that changes the model (random factors on both sides); the reference is the base
    # model under it, as the preference run holds it.
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(tiny_model), config).save_pretrained(tmp_path / "sft")
    precompute_reference_logps(
        tiny_model, pairs, tmp_path / "logps.jsonl", tmp_path / "reference.json", precision, sft_adapter_dir=tmp_path / "sft"
    )
    train_rows = len(list(read_jsonl(pairs["train"])))
    job = replace(
        _job(
            tiny_model, pairs, tmp_path / "logps.jsonl", tmp_path / "run", max_steps=1, batch_size=train_rows, precision=precision
        ),
        sft_adapter_dir=tmp_path / "sft",
        preference=PreferenceSettings(beta=BETA, start="adapter"),
    )
    # The policy starts as its reference: the first step earns no reward.
    logged, forwards = _first_step(job)
    tolerance = REWARD_TOLERANCE[precision]
    assert abs(logged["rewards/chosen"]) < tolerance and abs(logged["rewards/rejected"]) < tolerance
    assert logged["loss"] == pytest.approx(math.log(2), abs=tolerance) and forwards == 1


def test_a_pair_the_reference_lacks_is_an_error(tmp_path, tiny_model, pairs, reference):
    partial = write_jsonl(tmp_path / "partial.jsonl", list(read_jsonl(reference))[1:])
    with pytest.raises(PipelineError, match=r"partial.jsonl: no reference log-probs for 1 pairs of .*the reference was computed"):
        PreferenceRecipe(_job(tiny_model, pairs, partial, tmp_path, info=reference.with_name("reference.json"))).setup()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model, pairs, reference):
    """A preference run of 16 steps, its merged model and its held-out rewards."""
    from sftpipe.preference_train import train_preference

    out = tmp_path_factory.mktemp("tuned")
    summary = train_preference(_job(tiny_model, pairs, reference, out, max_steps=16, logging_steps=4, eval_steps=8))
    merge_adapter(tiny_model, out / "adapter", out / "merged", history_path=out / "history.json")
    info = reference.with_name("reference.json")
    metrics = evaluate_preference(out / "merged", pairs["test"], reference, info, out / "rewards.json", out / "pairs.jsonl", BETA)
    return out, summary, metrics


def test_the_preference_loss_goes_down(tuned):
    out, summary, _ = tuned
    history = json.loads((out / "history.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    evaluations = [h for h in history if "eval_loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=0.02) and losses[-1] < losses[0] - 0.05
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"] < math.log(2)
    assert evaluations[-1]["eval_rewards/accuracies"] > 0.5
    assert summary.steps == 16 and summary.eval_perplexity is None
    assert summary.settings["beta"] == BETA and summary.settings["loss_type"] == "sigmoid"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (out / "adapter").iterdir()}


def test_held_out_rewards_are_against_the_reference(tmp_path, tiny_model, pairs, reference, tuned):
    out, _, metrics = tuned
    scored = list(read_jsonl(out / "pairs.jsonl"))
    assert metrics["pairs"] == len(scored) == len(list(read_jsonl(pairs["test"])))
    for pair in scored:
        for reply in ("chosen", "rejected"):
            reward = BETA * (pair["logps"][reply] - pair["reference_logps"][reply])
            assert pair["rewards"][reply] == pytest.approx(reward)
    assert metrics["reward_accuracy"] == sum(p["rewards"]["chosen"] > p["rewards"]["rejected"] for p in scored) / len(scored)
    # The reference itself, scored the same way, earns no reward at all.
    info = reference.with_name("reference.json")
    untouched = evaluate_preference(tiny_model, pairs["test"], reference, info, tmp_path / "r.json", tmp_path / "p.jsonl", BETA)
    assert untouched["reward_margin"] == untouched["reward_accuracy"] == 0.0


def test_scoring_only_completion_positions_changes_no_loss(tmp_path, tiny_model, pairs, references, precision):
    import trl.trainer.utils

    cpu = torch.device("cpu")
    with completion_positions_only():
        assert trl.trainer.utils._use_triton(cpu)
    assert not trl.trainer.utils._use_triton(cpu)
    losses = {}
    for compact in (True, False):
        job = _job(tiny_model, pairs, references(precision), tmp_path / str(compact), max_steps=3, precision=precision)
        recipe = PreferenceRecipe(job)
        recipe.setup()
        recipe.train() if compact else super(PreferenceRecipe, recipe).train()
        losses[compact] = [
            value for h in recipe.trainer.state.log_history if "loss" in h for value in (h["loss"], h["rewards/margins"])
        ]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


def _raw(tmp_path, fmt, rows):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = DatasetSpec.from_config("pairs", {"format": fmt, "path": str(path)})
    out = tmp_path / "out"
    download_dataset(spec, out / "raw.jsonl", out / "manifest.json", None)
    return spec, out


def _hydrated(tmp_path, fmt, rows, template="chatml"):
    spec, out = _raw(tmp_path, fmt, rows)
    spec = replace(spec, template=template)
    hydrate_dataset(spec, out / "raw.jsonl", out / "hydrated.jsonl")
    return list(read_jsonl(out / "hydrated.jsonl"))


def _message(role, content):
    return {"role": role, "content": content}


def test_ultrafeedback_rows_share_the_prompt_and_keep_both_replies(tmp_path):
    # HuggingFaceH4/ultrafeedback_binarized: a prompt string, and whole conversations to choose between.
    h4 = {
        "prompt": "Name a colour.",
        "prompt_id": "abc",
        "chosen": [_message("user", "Name a colour."), _message("assistant", "Blue.")],
        "rejected": [_message("user", "Name a colour."), _message("assistant", "Seven.")],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    # TRL's explicit prompt: the shared turns apart, each reply alone.
    explicit = {
        "prompt": [
            _message("system", "Be brief."),
            _message("user", "Hi"),
            _message("assistant", "Hello."),
            _message("user", "Bye"),
        ],
        "chosen": [_message("assistant", "Goodbye.")],
        "rejected": [_message("assistant", "No.")],
    }
    first, second = _hydrated(tmp_path, "preference_messages", [h4, explicit])
    assert (first["prompt"], first["chosen"], first["rejected"]) == (
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        "Blue.",
        "Seven.",
    )
    assert second["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert second["prompt"].endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert (second["chosen"], second["rejected"]) == ("Goodbye.", "No.")
    assert "Seven." in first["content"] and "Blue." in first["content"]


def test_hh_rlhf_transcripts_split_off_their_shared_prompt(tmp_path):
    shared = "\n\nHuman: What is a good pet?\n\nAssistant: A cat.\n\nHuman: Why?\n\nAssistant:"
    row = {"chosen": shared + " Cats are calm.", "rejected": shared + " Because I said so."}
    [pair] = _hydrated(tmp_path, "hh_rlhf", [row], template="guanaco")
    assert pair["prompt"] == "### Human: What is a good pet?### Assistant: A cat.### Human: Why?### Assistant:"
    assert (pair["chosen"], pair["rejected"]) == (" Cats are calm.", " Because I said so.")


def test_pairs_with_nothing_to_learn_are_skipped_with_a_warning(tmp_path, caplog):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a?", "chosen": "same", "rejected": "same"},
        {"prompt": "a!", "chosen": " ", "rejected": "c"},
    ]
    with caplog.at_level("WARNING", logger="sftpipe"):
        hydrated = _hydrated(tmp_path, "preference", rows, template="qa")
    assert [h["chosen"] for h in hydrated] == ["b"]
    assert "raw.jsonl:2 (dataset 'pairs'): chosen and rejected replies are equal, row skipped" in caplog.text
    assert "raw.jsonl:3 (dataset 'pairs'): empty chosen reply, row skipped" in caplog.text


SHARED = "\n\nHuman: Hi\n\nAssistant:"


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("preference", {"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
        ("preference", {"prompt": "a", "chosen": "b", "rejected": 3}, "field 'rejected' must be a string, got int"),
        ("preference_messages", {"chosen": "Blue.", "rejected": []}, "field 'chosen' must be a non-empty list of messages"),
        (
            "preference_messages",
            {
                "chosen": [_message("user", "a"), _message("assistant", "b")],
                "rejected": [_message("user", "x"), _message("assistant", "c")],
            },
            "fields 'chosen' and 'rejected' must share every turn before the last assistant reply",
        ),
        (
            "preference_messages",
            {"chosen": [_message("user", "a")], "rejected": [_message("user", "a"), _message("assistant", "c")]},
            "field 'chosen' must end with an assistant reply",
        ),
        ("preference_messages", {"chosen": [{"role": "bot", "content": "b"}], "rejected": []}, r"chosen\[0\] needs 'role'"),
        (
            "hh_rlhf",
            {"chosen": "Human: Hi Assistant: b", "rejected": SHARED + " c"},
            "field 'chosen' must start with '\\\\n\\\\nHuman:'",
        ),
        (
            "hh_rlhf",
            {"chosen": SHARED + " b", "rejected": "\n\nHuman: Hello\n\nAssistant: c"},
            "fields 'chosen' and 'rejected' must share every turn",
        ),
        ("hh_rlhf", {"chosen": SHARED + " b"}, "missing field 'rejected'"),
    ],
    ids=[
        "missing field",
        "wrong type",
        "not a message list",
        "different prompts",
        "no reply",
        "unknown role",
        "no Human turn first",
        "different transcripts",
        "HH missing field",
    ],
)
def test_bad_pairs_name_file_line_and_field_and_leave_nothing(tmp_path, fmt, row, message):
    good = {
        "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
        "preference_messages": {
            "chosen": [_message("user", "a"), _message("assistant", "b")],
            "rejected": [_message("user", "a"), _message("assistant", "c")],
        },
        "hh_rlhf": {"chosen": SHARED + " b", "rejected": SHARED + " c"},
    }[fmt]
    with pytest.raises(PipelineError, match=rf"pairs.jsonl:2 \(dataset 'pairs', format '{fmt}'\): .*{message}"):
        _raw(tmp_path, fmt, [good, row])
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_preference_dataset_takes_a_named_template():
    with pytest.raises(PipelineError, match=r"'datasets.pairs.template': a preference format's pairs take a named template"):
        DatasetSpec.from_config(
            "pairs", {"format": "preference", "path": "x", "template": {"prompt": "{{ a }}", "completion": "{{ b }}"}}
        )


def _row(row_id, prompt, **replies):
    content = "\n".join([prompt, *replies.values()])
    return {"id": row_id, "source_id": row_id, "dataset": "d", "prompt": prompt, **replies, "content": content}


@pytest.mark.parametrize("against_sft", [True, False])
def test_pairs_sharing_words_with_the_sft_test_rows_are_removed(tmp_path, against_sft):
    split = SplitSettings(0.0, 0.5, 0)
    sft = [_row(f"sft-{i}", f"What number comes right after {i}?", completion=str(i + 1)) for i in range(40)]
    tested = next(r for r in sft if row_split(r, split) == "test")
    # A training pair on a held-out SFT question: tuned on it, the model would be scored on what it learned.
    leak = next(f"pair-{i}" for i in range(100) if assign_split(f"pair-{i}", split) == "train")
    leaked = _row(leak, tested["prompt"], chosen=tested["completion"], rejected="0")
    others = [
        _row(f"other-{i}", f"Which word ends the list {i} apple pear plum fig?", chosen="fig", rejected="apple") for i in range(9)
    ]
    filter_and_mix(
        [write_jsonl(tmp_path / "pairs.jsonl", [leaked, *others])],
        {},
        tmp_path / "mixed.jsonl",
        tmp_path / "filters.json",
        tmp_path / "removed.jsonl",
        FilterSettings(near_dedup=False),
        split,
        [],
        held_out_paths=[write_jsonl(tmp_path / "sft.jsonl", sft)] if against_sft else [],
    )
    removed = {r["id"]: r for r in read_jsonl(tmp_path / "removed.jsonl")}
    if against_sft:
        assert removed[leak]["reason"] == "test_overlap" and removed[leak]["match"] == tested["id"]
    else:
        assert leak not in removed


def _sweep_config(tmp_path, experiments, preference=None):
    config = {
        "experiments": experiments,
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {"demo": {"preset": "sftpipe_demo", "limit": 40}, "pairs": {"preset": "sftpipe_demo_pairs", "limit": 40}},
        "train": {"max_steps": 2},
        **({"preference": preference} if preference else {}),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PREFERENCE_RULES = {
    "filter_preference_data",
    "tokenize_preference_data",
    "precompute_reference_logps",
    "train_preference",
    "merge_preference_adapter",
    "evaluate_preference_lm_harness",
    "evaluate_preference",
}


@pytest.mark.parametrize(
    "sweep",
    [
        {"beta-0.1": {"preference": {"beta": 0.1}}, "beta-0.5": {"preference": {"beta": 0.5}}},
        {"dpo": {}, "ipo": {"preference": {"loss_type": "ipo"}}},
    ],
    ids=["beta", "loss type"],
)
def test_a_two_experiment_sweep_plans_one_reference_job(tmp_path, sweep):
    jobs = planned_jobs(tmp_path, _sweep_config(tmp_path, sweep, preference={"beta": 0.1}))
    # One SFT, one set of pairs, one reference; a preference run, merge and evaluation per experiment.
    assert jobs["precompute_reference_logps"] == 1
    assert jobs["train_lora"] == jobs["merge_adapter"] == 1
    assert jobs["filter_preference_data"] == jobs["tokenize_preference_data"] == 1
    assert jobs["train_preference"] == jobs["merge_preference_adapter"] == jobs["evaluate_preference"] == 2
    assert jobs["report"] == 2 and jobs["evaluate_exact_match"] == 2 + 2  # base and SFT once, each preference model


def test_a_sweep_over_the_preference_precision_plans_a_reference_per_precision(tmp_path):
    sweep = {"fp32": {"preference": {"train": {"precision": "fp32"}}}, "bf16": {"preference": {"train": {"precision": "bf16"}}}}
    jobs = planned_jobs(tmp_path, _sweep_config(tmp_path, sweep, preference={"beta": 0.1}))
    assert jobs["train_lora"] == 1 and jobs["precompute_reference_logps"] == 2


def test_keeping_the_sft_adapter_trains_and_merges_over_the_base_model(tmp_path):
    plan = snakemake(tmp_path, "-n", "--configfile", str(_sweep_config(tmp_path, {"a": {}}, preference={"start": "adapter"})))
    inputs = dict(re.findall(r"^rule (\w+):\n    input: (.*)$", plan.stdout, re.M))
    train, merge = (inputs[rule].split(", ") for rule in ("train_preference", "merge_preference_adapter"))
    assert {"results/train/a/adapter", "results/models/base/tiny"} <= set(train)
    assert "results/models/base/tiny" in merge and "results/models/merged/a" not in merge


def test_without_preference_settings_no_preference_stage_is_planned(tmp_path):
    jobs = planned_jobs(tmp_path, _sweep_config(tmp_path, {"a": {}, "b": {"train": {"lora_r": 4}}}))
    assert not PREFERENCE_RULES & set(jobs) and jobs["train_lora"] == 2


def _lm_eval(path, acc):
    metrics = {"acc,none": acc, "acc_stderr,none": 0.01}
    task = {"metrics": metrics, "n_samples": {"effective": 10}, "settings": {"num_fewshot": 0}, "data": {"test": "local"}}
    task["per_document"] = {"doc_id": [0, 1], "acc": [float(acc > 0), float(acc > 0.5)]}
    path.write_text(json.dumps({"tasks": {"demo_mc": task}}))
    return path


def _exact_match(tmp_path, variant, score, test_rows):
    metrics = {
        "rows": 2,
        "exact_match": score,
        "normalized_exact_match": score,
        "token_f1": score,
        "settings": {"max_new_tokens": 8},
    }
    metrics["per_dataset"] = {"d": {"rows": 2, "normalized_exact_match": score}}
    predictions = [
        {"id": r["id"], "prompt": r["prompt"], "reference": r["chosen"], "prediction": f"{variant} says"}
        | {metric: float(score > 0) for metric in ("exact_match", "normalized_exact_match", "token_f1")}
        for r in test_rows
    ]
    (tmp_path / f"{variant}.json").write_text(json.dumps(metrics))
    return tmp_path / f"{variant}.json", write_jsonl(tmp_path / f"{variant}.jsonl", predictions)


def test_the_report_sets_sft_and_preference_tuning_side_by_side(tmp_path, pairs, tuned):
    from sftpipe.report import PreferenceInputs, ReportInputs, ReportOutputs, comparison_rows, write_report

    out, _, rewards = tuned
    test_rows = list(read_jsonl(pairs["test"]))[:2]
    scores = {"base": 0.0, "tuned": 0.5, "preference": 0.75}
    em = {v: _exact_match(tmp_path, v, score, test_rows) for v, score in scores.items()}
    sft_data = {"rows_in": 1, "exact_duplicate": 0, "near_duplicate": 0, "eval_contamination": 0, "test_overlap": 0}
    (tmp_path / "filters.json").write_text(
        json.dumps({"datasets": {"d": {**sft_data, "rows_after_filters": 1, "weight": None, "rows_out": 1}}})
    )
    inputs = ReportInputs(
        lm_eval={v: _lm_eval(tmp_path / f"{v}.lm.json", score) for v, score in scores.items()},
        exact_match={v: paths[0] for v, paths in em.items()},
        predictions={v: paths[1] for v, paths in em.items()},
        history=out / "history.json",
        data_stats=pairs["train"].parent / "stats.json",
        filters=tmp_path / "filters.json",
        manifests=[pairs["train"].parent / "manifest.json"],
        preference=PreferenceInputs(
            rewards=out / "rewards.json", history=out / "history.json", stats=pairs["train"].parent / "stats.json"
        ),
    )
    outputs = ReportOutputs(**{name: tmp_path / "report" / f"{name}.out" for name in ReportOutputs.__dataclass_fields__})
    summary = write_report("dpo", inputs, outputs, {"train": {}, "preference": {"beta": BETA}})
    markdown = outputs.markdown.read_text()
    assert "| exact_match | 0.0000 | 0.5000 | +0.5000 | 0.7500 | +0.2500 |" in markdown
    assert "| demo_mc | acc | 0.0000 ± 0.0100 | 0.5000 ± 0.0100 | +0.5000 | 0.7500 ± 0.0100 | +0.2500 |" in markdown
    assert (
        "## Preference tuning" in markdown
        and f"| {rewards['reward_accuracy']:.4f} | {rewards['reward_margin']:+.4f} |" in markdown
    )
    assert "preference says" in outputs.sample_generations.read_text()
    compared = {(r["task"], r.get("compared")) for r in summary["significance"]}
    assert compared == {
        ("exact match", None),
        ("demo_mc", None),
        ("exact match", "preference vs tuned"),
        ("demo_mc", "preference vs tuned"),
    }
    assert summary["preference"]["held_out"] == rewards
    other = {**summary, "experiment": "dpo-b5", "setup": {"train": {}, "preference": {"beta": 0.5}}}
    rows = comparison_rows([summary, other])
    assert [r["train"] for r in rows] == [{"preference.beta": BETA}, {"preference.beta": 0.5}]
    assert rows[0]["exact_match"] == scores and rows[0]["reward_accuracy"] == rewards["reward_accuracy"]
