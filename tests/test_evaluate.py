"""Evaluate stage: exact-match scoring, batched generation, lm-eval on local copies of official tasks."""

import json

import pytest
import torch
from conftest import prepared, write_jsonl

from sftpipe.evaluate import evaluate_exact_match, evaluate_lm_harness, generate_greedy
from sftpipe.io import PipelineError, read_jsonl
from sftpipe.metrics import normalize_answer, token_f1
from sftpipe.model import load_model, load_tokenizer
from sftpipe.tasks import TaskSpec, build_task, task_manager
from sftpipe.tokenization import encode_rows


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        ("The Answer.", "answer", True),
        ("  an  apple ", "apple", True),
        ("Paris!", "paris", True),
        ("42", "43", False),
        ("river lamp", "lamp river", False),
    ],
)
def test_normalize_answer(prediction, reference, equal):
    assert (normalize_answer(prediction) == normalize_answer(reference)) is equal


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("river lamp", "lamp river", 1.0),
        ("the cat sat", "a cat", 2 * (1 / 2) * (1 / 1) / (1 / 2 + 1)),
        ("42", "43", 0.0),
        ("", "", 1.0),
        ("", "answer", 0.0),
    ],
)
def test_token_f1(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_batched_generation_equals_one_by_one(tiny_model):
    tokenizer, model = load_tokenizer(tiny_model), load_model(tiny_model).eval()
    prompts = ["Hello", "What is the tallest mountain on earth?", "2 + 2 =", "A much longer prompt about a river and a lamp"]
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(batched)


def test_exact_match_scores_predictions_against_references(tmp_path, tiny_model):
    tokenizer, model = load_tokenizer(tiny_model), load_model(tiny_model).eval()
    prompts = ["Say something:", "Another prompt:", "Third:", "Once upon a time", "The river", "Hello there"]
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    # A prompt whose greedy answer has letters, so that a reference in upper case with "!" added is a
    # normalized match but never a strict one.
    worded = next(i for i, o in enumerate(outputs) if normalize_answer(o) and o.upper() != o)
    cases = [(prompts[0], outputs[0]), (prompts[worded], outputs[worded].upper() + "!"), (prompts[2], "definitely not this")]
    test = write_jsonl(tmp_path / "test.jsonl", _tokenized(tokenizer, cases))
    metrics = evaluate_exact_match(tiny_model, test, tmp_path / "m.json", tmp_path / "p.jsonl", max_new_tokens=6, batch_size=2)
    predictions = list(read_jsonl(tmp_path / "p.jsonl"))
    assert [p["prediction"] for p in predictions] == [outputs[0], outputs[worded], outputs[2]]
    assert [p["exact_match"] for p in predictions] == [True, False, False]
    assert [p["normalized_exact_match"] for p in predictions] == [True, True, False]
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["normalized_exact_match"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == 3


def _tokenized(tokenizer, cases):
    """Held-out rows as the tokenize stage writes them, from (prompt, completion) pairs."""
    rows = [{"id": str(i), "dataset": "d", "prompt": p, "completion": c} for i, (p, c) in enumerate(cases)]
    return encode_rows(rows, tokenizer, max_length=256)


def test_exact_match_generates_from_the_prompts_as_trained(tmp_path, tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    [row] = _tokenized(tokenizer, [("Say something:", "yes")])
    row["input_ids"][0] += 1  # as if another tokenizer had tokenized the split
    test = write_jsonl(tmp_path / "test.jsonl", [row])
    with pytest.raises(PipelineError, match=r"row 0: the prompt generation would see differs from the one trained on at token 0"):
        evaluate_exact_match(tiny_model, test, tmp_path / "m.json", tmp_path / "p.jsonl")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.jsonl").exists()


def test_empty_test_split_is_an_error(tmp_path, tiny_model):
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(PipelineError, match="test_fraction"):
        evaluate_exact_match(tiny_model, tmp_path / "test.jsonl", tmp_path / "m.json", tmp_path / "p.jsonl")
    assert not (tmp_path / "m.json").exists()


@torch.no_grad()
def _choice_accuracy(model_dir, spec: TaskSpec) -> dict[str, float]:
    """acc and acc_norm of a multiple-choice task, computed here from the model's own log-probabilities:
    the choice whose continuation is most likely (acc_norm: per byte of the choice) is the answer."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    task = build_task(task_manager((spec.name,)), spec)
    hits = {"acc": 0, "acc_norm": 0}
    docs = list(task.eval_docs)[: spec.limit]
    for doc in docs:
        context = task.doc_to_text(doc)
        scores = []
        for choice in task.doc_to_choice(doc):
            continuation = task.config.target_delimiter + choice
            whole = tokenizer(context + continuation)["input_ids"]
            start = len(tokenizer(context)["input_ids"])
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1], -1)
            score = sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))
            scores.append((score, score / len(continuation.encode())))
        gold = task.doc_to_target(doc)
        gold = gold if isinstance(gold, int) else task.doc_to_choice(doc).index(gold)
        hits["acc"] += max(range(len(scores)), key=lambda i: scores[i][0]) == gold
        hits["acc_norm"] += max(range(len(scores)), key=lambda i: scores[i][1]) == gold
    return {metric: count / len(docs) for metric, count in hits.items()}


def test_lm_eval_runs_arc_and_hellaswag_offline(tmp_path, tiny_model, shared_data):
    arc = shared_data / "arc" / "hf_schema"
    tasks = [
        prepared(TaskSpec("arc_easy", limit=8, data_files={"test": str(arc / "ARC-Easy-test.jsonl")}), tmp_path / "arc_easy"),
        prepared(
            TaskSpec(
                "hellaswag", limit=8, data_files={"validation": str(shared_data / "hellaswag" / "hellaswag_val_sample1000.jsonl")}
            ),
            tmp_path / "hellaswag",
        ),
    ]
    summary = evaluate_lm_harness(tiny_model, tasks, tmp_path / "lm_eval.json", batch_size=8)
    for spec in tasks:
        result = summary["tasks"][spec.name]
        # The scores of the model we pointed it at, on the local data we gave it, and no other.
        expected = _choice_accuracy(tiny_model, spec)
        assert result["metrics"]["acc,none"] == pytest.approx(expected["acc"])
        assert result["metrics"]["acc_norm,none"] == pytest.approx(expected["acc_norm"])
        assert "acc_norm_stderr,none" in result["metrics"]
        assert result["n_samples"]["effective"] == 8 and set(result["data"].values()) == {"local"}
    assert summary["tasks"]["hellaswag"]["n_samples"]["original"] == 1000
    assert json.loads((tmp_path / "lm_eval.json").read_text()) == json.loads(json.dumps(summary))


CHAT = {
    "num_fewshot": 2,
    "apply_chat_template": True,
    "system_instruction": "Answer with the right choice.",
    "fewshot_as_multiturn": True,
}


@pytest.mark.parametrize("settings", [{}, CHAT], ids=["plain prompts", "chat template, system, multi-turn few-shot"])
def test_arc_easy_scores_equal_the_lm_eval_cli(tmp_path, tiny_model, shared_data, settings):
    """Parity: the pipeline's numbers, and each document's score, are exactly what plain `lm_eval` gives
    on the same data, model and settings (the same flags)."""
    import subprocess
    import sys

    import yaml

    arc = shared_data / "arc" / "hf_schema"
    data = {"test": str(arc / "ARC-Easy-test.jsonl"), "train": str(arc / "ARC-Easy-train.jsonl")}
    spec = prepared(TaskSpec("arc_easy", limit=24, data_files=data, **settings), tmp_path / "arc_easy")
    ours = evaluate_lm_harness(tiny_model, [spec], tmp_path / "ours.json", batch_size=8)["tasks"]["arc_easy"]

    # The CLI's own task: the official arc_easy YAML, included unchanged, reading the same local files.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    official = str(task_manager(("arc_easy",)).task_index["arc_easy"].yaml_path)
    cli_task = {"include": official, "task": "arc_easy_cli", "tag": [], "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": data}, "validation_split": None}  # fmt: skip
    (tasks / "arc_easy_cli.yaml").write_text(yaml.safe_dump(cli_task))
    flags = ["--num_fewshot", str(settings.get("num_fewshot", 0))]
    if settings:
        flags += ["--apply_chat_template", "--fewshot_as_multiturn", "--system_instruction", settings["system_instruction"]]
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_model},dtype=float32",
         "--tasks", "arc_easy_cli", "--include_path", str(tasks), "--limit", "24", "--batch_size", "8", "--device", "cpu",
         "--seed", "0,0,0,0", "--log_samples", "--output_path", str(tmp_path / "cli"), *flags],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    [cli_json] = (tmp_path / "cli").rglob("results_*.json")
    cli_metrics = json.loads(cli_json.read_text())["results"]["arc_easy_cli"]
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert cli_metrics[key] == ours["metrics"][key], key
    [cli_samples] = (tmp_path / "cli").rglob("samples_arc_easy_cli_*.jsonl")
    per_document = sorted((json.loads(line) for line in cli_samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert ours["per_document"]["doc_id"] == [s["doc_id"] for s in per_document] == list(range(24))
    assert ours["per_document"]["acc"] == [s["acc"] for s in per_document]
    assert ours["settings"] | settings == ours["settings"]  # the settings recorded beside the numbers


def test_a_limit_scores_a_seeded_sample_of_every_dataset(tmp_path, tiny_model):
    """Issue 29: 35 Alpaca rows then 26 lamini rows, limit 40, scored 35 Alpaca and 5 lamini rows."""
    from sftpipe.evaluate import SAMPLE, sample_rows

    rows = [{"id": f"alpaca-{i}", "dataset": "alpaca"} for i in range(35)] + [
        {"id": f"lamini-{i}", "dataset": "lamini"} for i in range(26)
    ]
    sample = sample_rows(rows, 40, seed=0)
    assert [r["dataset"] for r in sample].count("alpaca") == 23 and len(sample) == 40  # 40 * 35 / 61 = 22.95
    assert sample != rows[:40] and sample == [r for r in rows if r in sample]  # not the first rows; in their order
    # The same rows whatever order the split lists them in; another seed, others.
    assert sorted(r["id"] for r in sample_rows(rows[::-1], 40, seed=0)) == sorted(r["id"] for r in sample)
    assert sample_rows(rows, 40, seed=1) != sample
    assert sample_rows(rows, None, seed=0) == sample_rows(rows, 61, seed=0) == rows

    tokenizer = load_tokenizer(tiny_model)
    test = _tokenized(tokenizer, [("Say something:", "yes"), ("Third:", "no"), ("The river", "flows")])
    test[2]["dataset"] = "other"
    metrics = evaluate_exact_match(
        tiny_model, write_jsonl(tmp_path / "t.jsonl", test), tmp_path / "m.json", tmp_path / "p.jsonl", max_new_tokens=2, limit=2
    )
    assert metrics["rows"] == 2 and set(metrics["per_dataset"]) == {"d", "other"}
    assert metrics["settings"]["sample"] == SAMPLE and metrics["settings"]["seed"] == 0
