"""Evaluate stage: exact-match scoring, batched generation, lm-eval on local copies of official tasks."""

import json

import pytest

from conftest import write_jsonl
from sftpipe.evaluate import (
    TaskSpec,
    download_task_data,
    exact_match_eval,
    generate_greedy,
    lm_eval_tasks,
    task_config,
)
from sftpipe.io import PipelineError, read_jsonl
from sftpipe.metrics import normalize_answer, token_f1
from sftpipe.model import load_model, load_tokenizer


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
    prompts = ["Say something:", "Another prompt:", "Third:"]
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    # One reference equals the model's own greedy answer, one differs only in case and punctuation, one is wrong.
    references = [outputs[0], outputs[1].upper() + "!", "definitely not this"]
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"id": str(i), "dataset": "d", "prompt": p, "completion": r} for i, (p, r) in enumerate(zip(prompts, references))
    ])
    metrics = exact_match_eval(tiny_model, test, tmp_path / "m.json", tmp_path / "p.jsonl", max_new_tokens=6, batch_size=2)
    predictions = list(read_jsonl(tmp_path / "p.jsonl"))
    assert [p["prediction"] for p in predictions] == outputs
    assert [p["exact_match"] for p in predictions] == [True, outputs[1].strip() == references[1].strip(), False]
    assert metrics["normalized_exact_match"] == pytest.approx(2 / 3) or not normalize_answer(outputs[1])
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == 3


def test_empty_test_split_is_an_error(tmp_path, tiny_model):
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(PipelineError, match="test_fraction"):
        exact_match_eval(tiny_model, tmp_path / "test.jsonl", tmp_path / "m.json", tmp_path / "p.jsonl")
    assert not (tmp_path / "m.json").exists()


@pytest.fixture(scope="module")
def task_manager():
    from sftpipe.evaluate import task_manager

    return task_manager()


@pytest.mark.parametrize(("num_fewshot", "splits"), [(0, ["test"]), (5, ["test", "train"])])
def test_downloaded_arc_keeps_official_prompt_and_metrics(task_manager, shared_data, tmp_path, num_fewshot, splits):
    mirror = tmp_path / "mirror" / "allenai" / "ai2_arc" / "ARC-Challenge"
    mirror.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (mirror / f"{split}.jsonl").symlink_to(shared_data / "arc" / "hf_schema" / f"ARC-Challenge-{split}.jsonl")
    spec = TaskSpec("arc_challenge", num_fewshot=num_fewshot, data_dir=str(tmp_path / "arc_challenge"))
    sources = download_task_data(spec, spec.data_dir, str(tmp_path / "mirror"))
    # Only what lm-eval reads: the evaluation split, and the few-shot examples' split when few-shot.
    assert sorted(sources) == sorted(splits) and all(s["kind"] == "mirror" for s in sources.values())
    original = [json.loads(line) for line in (mirror / "test.jsonl").open() if line.strip()]
    assert list(read_jsonl(tmp_path / "arc_challenge" / "test.jsonl")) == original
    assert sources["test"]["rows"] == len(original)
    local = task_config(task_manager, spec)
    assert local["dataset_path"] == "json"
    assert local["dataset_kwargs"] == {"data_files": {s: str(tmp_path / "arc_challenge" / f"{s}.jsonl") for s in sorted(splits)}}
    assert local["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert [m["metric"] for m in local["metric_list"]] == ["acc", "acc_norm"]
    assert local["test_split"] == "test" and local["training_split"] == ("train" if num_fewshot else None)
    # Without local data the task is left to lm-eval as named (it reads the Hub).
    assert task_config(task_manager, TaskSpec("arc_challenge")) == "arc_challenge"


def test_named_tasks_index_only_their_own_directories(task_manager):
    from sftpipe.evaluate import task_manager as manager_for

    narrow = manager_for(("arc_easy", "hellaswag", "sftpipe_demo_mc"))
    assert len(narrow.task_index) < 20 < len(task_manager.task_index)
    for name in ("arc_easy", "hellaswag", "sftpipe_demo_mc"):
        assert narrow.task_index[name].yaml_path == task_manager.task_index[name].yaml_path
    # A tag names tasks defined elsewhere: the whole index.
    assert len(manager_for(("ai2_arc",)).task_index) == len(task_manager.task_index)


def test_unknown_task_and_missing_file_name_the_config_key(task_manager, tmp_path):
    with pytest.raises(PipelineError, match="eval.lm_eval.tasks.*no_such_task"):
        task_config(task_manager, TaskSpec("no_such_task"))
    with pytest.raises(PipelineError, match="eval.lm_eval.tasks.*not found"):
        task_config(task_manager, TaskSpec("arc_easy", data_files={"test": str(tmp_path / "missing.jsonl")}))


def test_lm_eval_runs_arc_and_hellaswag_offline(tmp_path, tiny_model, shared_data):
    arc = shared_data / "arc" / "hf_schema"
    tasks = [
        TaskSpec("arc_easy", limit=8, data_files={"test": str(arc / "ARC-Easy-test.jsonl")}),
        TaskSpec("hellaswag", limit=8, data_files={"validation": str(shared_data / "hellaswag" / "hellaswag_val_sample1000.jsonl")}),
    ]
    summary = lm_eval_tasks(tiny_model, tasks, tmp_path / "lm_eval.json", batch_size=8)
    for name in ("arc_easy", "hellaswag"):
        metrics = summary["tasks"][name]["metrics"]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_norm_stderr,none" in metrics
        assert summary["tasks"][name]["n_samples"]["effective"] == 8
        assert summary["tasks"][name]["data"] == "local"
    assert summary["tasks"]["hellaswag"]["n_samples"]["original"] == 1000
    assert json.loads((tmp_path / "lm_eval.json").read_text()) == json.loads(json.dumps(summary))


def test_arc_easy_accuracy_equals_the_lm_eval_cli(tmp_path, tiny_model, shared_data, task_manager):
    """Parity: the pipeline's number is exactly what plain `lm_eval` gives on the same data, model and settings."""
    import subprocess
    import sys

    import yaml

    test_file = str(shared_data / "arc" / "hf_schema" / "ARC-Easy-test.jsonl")
    ours = lm_eval_tasks(tiny_model, [TaskSpec("arc_easy", limit=24, data_files={"test": test_file})], tmp_path / "ours.json", batch_size=8)
    ours = ours["tasks"]["arc_easy"]["metrics"]

    # The CLI's own task: the official arc_easy YAML, included unchanged, reading the same local file.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc_easy_cli.yaml").write_text(yaml.safe_dump({
        "include": str(task_manager.task_index["arc_easy"].yaml_path),
        "task": "arc_easy_cli",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": test_file}},
        "training_split": None,
        "validation_split": None,
    }))
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_model},dtype=float32",
         "--tasks", "arc_easy_cli", "--include_path", str(tasks), "--limit", "24", "--batch_size", "8",
         "--device", "cpu", "--output_path", str(tmp_path / "cli")],
        capture_output=True, text=True, check=True,
    )
    printed = {}
    for line in cli.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 8 and cells[5] in ("acc", "acc_norm"):
            printed[cells[5]] = cells[7]
    assert printed == {"acc": f"{ours['acc,none']:.4f}", "acc_norm": f"{ours['acc_norm,none']:.4f}"}
    [cli_json] = (tmp_path / "cli").rglob("results_*.json")
    cli_metrics = json.loads(cli_json.read_text())["results"]["arc_easy_cli"]
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert cli_metrics[key] == ours[key], key
