"""Snakemake itself, end to end on a tiny config: real Alpaca/ARC/HellaSwag samples through a mirror,
Dolphin and Guanaco fixtures in their real schemas, the tiny-random model. Then caching: a second run
has nothing to do, and an evaluation-only change reruns no training job."""

import html
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from workflow import HF_TOKEN, concurrency, planned_jobs, snakemake, stray_files

from sftpipe.io import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(sweep_run) -> Path:
    return sweep_run[0]


def test_every_stage_wrote_its_artifacts(workdir):
    results = workdir / "results"
    for name in ("alpaca", "dolphin", "guanaco"):
        manifest = json.loads((results / "data" / "raw" / f"{name}.manifest.json").read_text())
        assert manifest["rows"] == (60 if name == "alpaca" else 20)
        [hydrated] = (results / "data" / "hydrated").glob(f"*/{name}.jsonl")
        # Dolphin's ChatML renders with the base model's own chat template, the others with a named one.
        assert hydrated.parent.name == ("chat-tiny" if name == "dolphin" else name) and hydrated.stat().st_size > 0
    assert json.loads((results / "data" / "raw" / "alpaca.manifest.json").read_text())["source"]["kind"] == "mirror"
    filters = json.loads((results / "data" / "mixed" / "smoke.filters.json").read_text())
    # The fixtures repeat each Dolphin and Guanaco row ten times: exact dedup keeps one of each.
    assert filters["datasets"]["dolphin"]["exact_duplicate"] == 18
    assert filters["settings"]["eval_tasks"] == ["arc_easy", "arc_challenge", "hellaswag"]
    rows_out = sum(f["rows_out"] for f in filters["datasets"].values())
    stats = json.loads((results / "data" / "tokenized" / "smoke" / "stats.json").read_text())
    assert sum(stats[s]["rows"] for s in ("train", "validation", "test")) == rows_out
    assert (results / "train" / "smoke" / "adapter" / "adapter_model.safetensors").exists()
    assert (results / "models" / "merged" / "smoke" / "model.safetensors").exists()
    for lm_eval in ("base_model/tiny", "smoke/tuned"):
        lm = json.loads((results / "eval" / lm_eval / "lm_eval.json").read_text())
        assert set(lm["tasks"]) == {"arc_easy", "arc_challenge", "hellaswag"}
        # Where each task's data came from: the mirror, or the user's own file (arc_challenge's).
        assert {name: t["data"] for name, t in lm["tasks"].items()} == {
            "arc_easy": {"test": "mirror"},
            "arc_challenge": {"test": "local"},
            "hellaswag": {"validation": "mirror"},
        }
    for variant in ("base", "tuned"):
        em = json.loads((results / "eval" / "smoke" / variant / "exact_match.json").read_text())
        assert em["rows"] == min(12, stats["test"]["rows"]) > 0  # the configured limit, or every held-out row
    report = (results / "report" / "smoke.md").read_text()
    assert "| arc_easy | acc |" in report and "| hellaswag | acc_norm |" in report
    assert "normalized_exact_match" in report
    # Base vs tuned, paired item by item, in the report and its summary.
    assert "## Is the difference real?" in report
    summary = json.loads((results / "report" / "smoke.json").read_text())
    paired = {(r["task"], r["metric"]): r for r in summary["significance"]}
    assert {("exact match", "normalized_exact_match"), ("arc_easy", "acc"), ("hellaswag", "acc_norm")} <= set(paired)
    for row in paired.values():
        assert row["ci_low"] <= row["delta"] <= row["ci_high"] and 0 < row["p_value"] <= 1
    assert "sample_len" not in report
    for rule in ("train_lora", "tokenize_and_split", "evaluate_lm_harness"):
        assert any((results / "logs" / rule).rglob("*.log")), rule
    assert (results / "benchmarks" / "train_lora" / "smoke.tsv").exists()


def test_a_tracked_experiment_logs_training_and_evaluation_to_one_tensorboard_run(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((workdir / "results" / "train" / "smoke-r4" / "history.json").read_text())
    events = EventAccumulator(history["summary"]["tracking"]["tensorboard_dir"])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/loss" in tags and "eval/exact_match/normalized_exact_match/tuned" in tags
    assert "eval/arc_easy/acc/base" in tags
    assert not (workdir / "results" / "tracking" / "tensorboard" / "smoke").exists()  # smoke is not tracked


def test_html_report_holds_plots_and_tables(workdir):
    snakemake(workdir, "--report", "report.zip", "--configfile", "smoke.yaml")
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        names = archive.namelist()
        for artifact in ("loss_curves.png", "eval_comparison.png", "token_lengths.png"):
            images = [n for n in names if n.endswith(artifact)]
            assert len(images) == 2  # one per experiment
            assert all(archive.read(image).startswith(b"\x89PNG") for image in images)
        for table in ("exact_match.html", "sample_generations.html", "data.html", "experiments.html"):
            pages = [n for n in names if n.endswith(table)]
            assert len(pages) == (1 if table == "experiments.html" else 2)
            assert all(b"<table>" in archive.read(page) for page in pages)
        rows = [n for n in names if n.endswith("training_rows.html")]
        assert len(rows) == 2 and all(b"<span class='learned'>" in archive.read(page) for page in rows)
    samples = (workdir / "results" / "report" / "smoke" / "sample_generations.html").read_text()
    predictions = [json.loads(line) for line in (workdir / "results" / "eval" / "smoke" / "tuned" / "predictions.jsonl").open()]
    assert html.escape(predictions[0]["reference"]) in samples
    summary = json.loads((workdir / "results" / "summary.json").read_text())
    assert summary["experiments"]["smoke"]["exact_match"][0]["metric"] == "exact_match"


def test_hub_token_never_lands_in_logs_or_artifacts(workdir):
    written = [p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) > 50
    assert not [p for p in written if HF_TOKEN.encode() in p.read_bytes()]


def test_second_run_has_nothing_to_do(workdir):
    assert planned_jobs(workdir, workdir / "smoke.yaml") == {}


def test_changing_an_eval_setting_reruns_no_training(workdir):
    config = yaml.safe_load((workdir / "smoke.yaml").read_text())
    config["eval"]["lm_eval"]["tasks"][0]["limit"] = 7
    changed = workdir / "smoke-eval-changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(workdir, changed)
    assert jobs.get("evaluate_base_lm_harness") == 1
    assert jobs.get("evaluate_lm_harness") == 2 and jobs.get("report") == 2
    assert not {"train_lora", "merge_adapter", "tokenize_and_split", "filter_and_mix", "download_dataset"} & set(jobs)


def test_changing_a_training_setting_reruns_training_but_not_data(workdir):
    config = yaml.safe_load((workdir / "smoke.yaml").read_text())
    config["train"]["learning_rate"] = 0.001
    changed = workdir / "smoke-train-changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(workdir, changed)
    assert jobs.get("train_lora") == 2
    assert not {"download_dataset", "hydrate_dataset", "tokenize_and_split", "materialize_base_model"} & set(jobs)


DATA_AND_TRAINING = {
    "materialize_base_model",
    "download_dataset",
    "hydrate_dataset",
    "prepare_eval_data",
    "filter_and_mix",
    "tokenize_and_split",
    "train_lora",
    "merge_adapter",
}


def test_editing_a_metric_reruns_evaluation_and_reports_only(workdir):
    import os

    metrics = REPO / "sftpipe" / "metrics.py"
    original, times = metrics.read_bytes(), os.stat(metrics)
    try:
        # An edit: Snakemake compares an input's content, not only its time, with what the job last read.
        metrics.write_bytes(original + b"\n# an edited comment\n")
        jobs = planned_jobs(workdir, workdir / "smoke.yaml")
    finally:
        metrics.write_bytes(original)
        os.utime(metrics, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert jobs.get("evaluate_exact_match") == 4 and jobs.get("report") == 2, jobs
    assert not DATA_AND_TRAINING & set(jobs), jobs


@pytest.mark.parametrize("change", [{"allocator": "system"}, {"processes": 2}, {"gpus": 2}])
def test_how_training_runs_is_no_reason_to_train_again(workdir, change):
    config = yaml.safe_load((workdir / "smoke.yaml").read_text())
    config["train"].update(change)
    changed = workdir / "smoke-execution.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert planned_jobs(workdir, changed) == {}


def test_changing_one_experiment_reruns_only_that_experiment(workdir):
    config = yaml.safe_load((workdir / "smoke.yaml").read_text())
    config["experiments"]["smoke-r4"]["train"]["lora_r"] = 2
    changed = workdir / "smoke-one-changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(workdir, changed)
    assert jobs.get("train_lora") == 1 and jobs.get("report") == 1 and jobs.get("evaluate_exact_match") == 1
    assert "evaluate_base_lm_harness" not in jobs and "tokenize_and_split" not in jobs


def test_sweep_shares_stages_runs_data_jobs_in_parallel_and_one_gpu_job_at_a_time(sweep_run):
    workdir, log = sweep_run
    started = re.findall(r"^(?:local)?rule (\w+):", log, re.M)
    counts = {rule: started.count(rule) for rule in set(started)}
    # Shared by both experiments, hence once: the base model, each dataset's download and hydration,
    # and the base model's lm-eval scores.
    assert counts["materialize_base_model"] == 1 and counts["evaluate_base_lm_harness"] == 1
    assert counts["download_dataset"] == 3 and counts["hydrate_dataset"] == 3
    # Per experiment: its data mix, training, merge, tuned scores, and exact match of base and tuned
    # on its own held-out rows.
    assert counts["filter_and_mix"] == counts["train_lora"] == counts["merge_adapter"] == counts["report"] == 2
    assert counts["evaluate_exact_match"] == 4
    gpu_rules = {"train_lora", "evaluate_lm_harness", "evaluate_base_lm_harness", "evaluate_exact_match"}
    snapshots = concurrency(log)
    assert max(len([r for r in running if r in gpu_rules]) for running in snapshots) == 1
    assert any(len([r for r in running if r not in gpu_rules]) >= 2 for running in snapshots)
    summary = json.loads((workdir / "results" / "summary.json").read_text())
    assert [row["experiment"] for row in summary["comparison"]] == ["smoke", "smoke-r4"]
    assert [row["train"] for row in summary["comparison"]] == [{"lora_r": 16}, {"lora_r": 4}]
    assert summary["comparison"][1]["datasets"] == ["alpaca", "guanaco"]
    comparison = (workdir / "results" / "report" / "experiments.html").read_text()
    assert "smoke-r4" in comparison and "lora_r=4" in comparison


def test_exporting_adds_the_gguf_files_and_the_exported_column_and_reruns_nothing_else(workdir, tmp_path):
    """The finished sweep, exporting Q8_0 too: the export, the exported model's exact match and the
    report are all that run; base and tuned figures stay as they were."""
    work = tmp_path / "sweep"
    shutil.copytree(workdir, work, symlinks=True)
    config = yaml.safe_load((work / "smoke.yaml").read_text())
    config["export"] = {"gguf": ["q8_0"]}
    (work / "export.yaml").write_text(yaml.safe_dump(config))
    results = work / "results"
    before = {v: (results / "eval" / "smoke" / v / "exact_match.json").read_bytes() for v in ("base", "tuned")}
    target = "results/report/smoke.json"
    assert planned_jobs(work, work / "export.yaml", target) == {"export_gguf": 1, "evaluate_exact_match": 1, "report": 1}
    snakemake(work, target, "--cores", "2", "--resources", "gpu=1", "--configfile", "export.yaml")
    # Snakemake's own .snakemake_timestamp aside.
    exports = sorted(p.name for p in (results / "export" / "smoke").iterdir() if not p.name.startswith("."))
    assert exports == ["Modelfile", "manifest.json", "smoke-q8_0.gguf"]
    exported = json.loads((results / "eval" / "smoke" / "exported" / "exact_match.json").read_text())
    assert exported["settings"]["gguf_file"] == "smoke-q8_0.gguf"
    summary = json.loads((results / "report" / "smoke.json").read_text())
    assert [row["exported"] for row in summary["exact_match"]] == [exported[row["metric"]] for row in summary["exact_match"]]
    report = (results / "report" / "smoke.md").read_text()
    assert "| metric | base | tuned | delta | exported | delta vs tuned |" in report
    same = summary["exported"]["same_answers"]
    assert "exported: `smoke-q8_0.gguf`, read back alone through transformers' GGUF loader; its greedy answers " in report
    assert f"are the merged model's on {same} of {exported['rows']} rows." in report
    tuned = [p["prediction"] for p in read_jsonl(results / "eval" / "smoke" / "tuned" / "predictions.jsonl")]
    answers = [p["prediction"] for p in read_jsonl(results / "eval" / "smoke" / "exported" / "predictions.jsonl")]
    assert summary["exported"] == {
        "gguf_file": "smoke-q8_0.gguf",
        "rows": exported["rows"],
        "same_answers": sum(a == t for a, t in zip(answers, tuned, strict=True)),
    }
    assert {v: (results / "eval" / "smoke" / v / "exact_match.json").read_bytes() for v in ("base", "tuned")} == before


def test_default_config_dry_run_lists_every_stage(tmp_path):
    jobs = planned_jobs(tmp_path, REPO / "config" / "config.yaml")
    for rule in (
        "materialize_base_model",
        "download_dataset",
        "hydrate_dataset",
        "filter_and_mix",
        "tokenize_and_split",
        "train_lora",
        "merge_adapter",
        "evaluate_lm_harness",
        "evaluate_exact_match",
        "report",
    ):
        assert rule in jobs, rule
    assert jobs["download_dataset"] == 3


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint", "--configfile", str(REPO / "config" / "config.yaml"), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def _config_problems(tmp_path, edit) -> list[str]:
    """What `snakemake -n` prints for the demo config after `edit`: it must fail."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    edit(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0
    return (result.stdout + result.stderr).strip().splitlines()


def _sweep(config, experiments):
    del config["experiment"]
    config["experiments"] = experiments


@pytest.mark.parametrize(
    ("edit", "problems"),
    [
        (
            lambda c: c["train"].update(lora_rank=4, learning_rate="fast"),
            [
                "config key 'train.learning_rate': 'fast' is not a number",
                "config key 'train.lora_rank': unknown key (did you mean lora_r?)",
            ],
        ),
        (
            lambda c: _sweep(c, {"fast": {"train": {"learning_rate": 1e-3}}, "broken": {"train": {"lora_r": "big"}}}),
            ["config key 'experiments.broken.train.lora_r': 'big' is not an integer"],
        ),
        (
            lambda c: c["datasets"]["demo"].update(preset="alpacca"),
            [
                "config key 'datasets.demo.preset': 'alpacca' is not one of alpaca, dolphin, guanaco, lamini_docs, "
                "sftpipe_demo, sftpipe_demo_pairs (did you mean alpaca?)"
            ],
        ),
        (
            lambda c: c["datasets"]["demo"].update(hub_id="acme/rows", url="https://example.org/rows.jsonl"),
            ["config key 'datasets.demo': give one source, not 'hub_id' and 'url'"],
        ),
        (
            lambda c: c["export"].update(serve="bf16"),
            ["config key 'export.serve': 'bf16' is not among the exported types (export.gguf: f16, q8_0)"],
        ),
    ],
    ids=["top-level train keys", "an experiment's train override", "unknown preset", "two sources", "served type not exported"],
)
def test_a_bad_config_prints_each_key_first_and_alone(tmp_path, edit, problems):
    # Exactly the problems, one line each: no schema dump, no traceback.
    assert _config_problems(tmp_path, edit) == problems
    assert not (tmp_path / "results").exists()


def test_bad_input_fails_the_rule_with_file_and_line_and_leaves_no_artifact(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["datasets"] = {"broken": {"preset": "alpaca", "path": "broken.jsonl"}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "results/data/raw/broken.jsonl", "--cores", "1", "--configfile", "broken.yaml", check=False)
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "download_dataset" / "broken.log").read_text()
    assert "broken.jsonl:2:17: malformed JSON" in log
    assert "broken.jsonl:2:17: malformed JSON" in result.stdout + result.stderr
    # Snakemake deletes a failed job's outputs itself; what is ours to clean up is our temporary files.
    assert not (tmp_path / "results" / "data" / "raw" / "broken.jsonl").exists()
    assert not (tmp_path / "results" / "data" / "raw" / "broken.manifest.json").exists()
    assert not stray_files(tmp_path / "results"), stray_files(tmp_path / "results")


def test_the_dot_test_config_runs_end_to_end(tmp_path):
    """`.test/config/config.yaml`, the workflow's own test, needs nothing outside the repository."""
    snakemake(tmp_path, "--cores", "2", "--resources", "gpu=1", "--configfile", str(REPO / ".test" / "config" / "config.yaml"))
    summary = json.loads((tmp_path / "results" / "report" / "dot-test.json").read_text())
    assert summary["training"]["steps"] == 4
    assert {row["metric"] for row in summary["exact_match"]} == {"exact_match", "normalized_exact_match", "token_f1"}
    assert [row["task"] for row in summary["lm_eval"]] == ["sftpipe_demo_mc", "sftpipe_demo_mc"]
