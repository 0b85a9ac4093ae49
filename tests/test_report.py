"""Report stage on small artifacts written here: a registered metric reaches the report, the data
tables say what they count, the samples show a shared prompt start once, every figure and
report page names its experiment, in a sweep too."""

import io
import json
from pathlib import Path

import jinja2
import pytest
from conftest import REPO, write_jsonl
from docutils.core import publish_parts

import sftpipe.report
from sftpipe.evaluate import evaluate_exact_match
from sftpipe.metrics import EXACT_MATCH_METRICS, Metric
from sftpipe.model import load_tokenizer
from sftpipe.report import ReportInputs, ReportOutputs, write_report
from sftpipe.tokenization import encode_rows

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def _history(path: Path) -> Path:
    summary = {
        "train_loss": 1.0, "eval_loss": 0.9, "eval_perplexity": 2.5, "steps": 4, "steps_run": 4, "resumed_from_step": 0,
        "train_runtime_s": 3.0, "train_tokens": 100, "train_tokens_per_s": 33.0, "projected_positions": 50,
        "train_rows": 8, "validation_rows": 2, "precision": "fp32", "attention": "sdpa", "world_size": 1,
        "allocator": "system", "settings": {}, "tracking": {},
    }  # fmt: skip
    log_history = [{"step": 2, "loss": 1.2}, {"step": 4, "loss": 1.0, "eval_loss": 0.9}]
    path.write_text(json.dumps({"summary": summary, "log_history": log_history}))
    return path


def _stats(path: Path) -> Path:
    split = {"rows": 4, "tokens": 40, "truncated": 0, "dropped_too_long": 0, "length_histogram": {"0": 4}}
    preview = {"chat": [[{"text": SYSTEM + "Hi<|im_end|>\n", "learned": False}, {"text": "Hello", "learned": True}]]}
    stats = {**{s: split for s in ("train", "validation", "test")}, "settings": {"histogram_bin_width": 16}, "preview": preview}
    path.write_text(json.dumps(stats))
    return path


def _lm_eval(path: Path, acc: float) -> Path:
    task = {
        "metrics": {"acc,none": acc, "acc_stderr,none": 0.01},
        "n_samples": {"effective": 2},
        "settings": {"num_fewshot": 0},
        "data": {"test": "local"},
        "per_document": {"doc_id": [0, 1], "acc": [float(acc > 0), float(acc > 0.5)]},
    }
    path.write_text(json.dumps({"tasks": {"demo_mc": task}}))
    return path


def _inputs(tmp_path: Path, exact_match: dict[str, Path], predictions: dict[str, Path]) -> ReportInputs:
    manifest = {"name": "chat", "source": {"kind": "path"}, "rows": 1, "sha256": "0" * 64}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    counts = {"rows_in": 3, "exact_duplicate": 0, "near_duplicate": 0, "eval_contamination": 0, "test_overlap": 0}
    filters = {"datasets": {"chat": {**counts, "rows_after_filters": 3, "weight": None, "rows_out": 3}}}
    (tmp_path / "filters.json").write_text(json.dumps(filters))
    return ReportInputs(
        lm_eval={v: _lm_eval(tmp_path / f"{v}.lm.json", acc) for v, acc in (("base", 0.0), ("tuned", 0.5))},
        exact_match=exact_match,
        predictions=predictions,
        history=_history(tmp_path / "history.json"),
        data_stats=_stats(tmp_path / "stats.json"),
        filters=tmp_path / "filters.json",
        manifests=[tmp_path / "manifest.json"],
    )


def _outputs(tmp_path: Path) -> ReportOutputs:
    return ReportOutputs(**{name: tmp_path / "report" / f"{name}.out" for name in ReportOutputs.__dataclass_fields__})


def _scored(tmp_path: Path, variant: str, prompts: list[str]) -> tuple[Path, Path]:
    """exact_match.json and predictions.jsonl of a variant that answers every prompt alike."""
    rows = [
        {"id": str(i), "dataset": "chat", "prompt": p, "reference": "yes", "prediction": f"{variant} says"}
        | {name: False for name in EXACT_MATCH_METRICS}
        for i, p in enumerate(prompts)
    ]
    scores = {name: 0.0 for name in EXACT_MATCH_METRICS}
    metrics = {"rows": len(rows), **scores, "per_dataset": {"chat": {"rows": len(rows), **scores}}}
    metrics["settings"] = {"max_new_tokens": 8}
    (tmp_path / f"{variant}.json").write_text(json.dumps(metrics))
    return tmp_path / f"{variant}.json", write_jsonl(tmp_path / f"{variant}.jsonl", rows)


def test_a_registered_metric_reaches_evaluation_and_the_report(tmp_path, tiny_model, monkeypatch):
    """Adding an exact-match metric is one function and one registry entry (ARCHITECTURE.md's recipe)."""

    def answer_words(prediction: str, reference: str) -> float:
        return float(len(prediction.split()) <= len(reference.split()))

    monkeypatch.setitem(EXACT_MATCH_METRICS, "answer_words", Metric(answer_words, right_or_wrong=True))
    tokenizer = load_tokenizer(tiny_model)
    rows = [{"id": str(i), "dataset": "chat", "prompt": p, "completion": "yes"} for i, p in enumerate(["Hi:", "Say:"])]
    test = write_jsonl(tmp_path / "test.jsonl", encode_rows(rows, tokenizer, max_length=64))
    paths = {v: (tmp_path / f"{v}.em.json", tmp_path / f"{v}.jsonl") for v in ("base", "tuned")}
    for metrics, predictions in paths.values():
        evaluated = evaluate_exact_match(tiny_model, test, metrics, predictions, max_new_tokens=4, batch_size=2)
    assert "answer_words" in evaluated and all("answer_words" in json.loads(line) for line in predictions.open())
    inputs = _inputs(tmp_path, {v: p[0] for v, p in paths.items()}, {v: p[1] for v, p in paths.items()})
    summary = write_report("demo", inputs, _outputs(tmp_path))
    assert "answer_words" in {r["metric"] for r in summary["exact_match"]}
    [paired] = [r for r in summary["significance"] if r["metric"] == "answer_words"]
    assert "mcnemar_p_value" in paired
    assert "| answer_words |" in (tmp_path / "report" / "markdown.out").read_text()
    assert "answer_words" in (tmp_path / "report" / "exact_match_table.out").read_text()


@pytest.fixture
def report(tmp_path):
    prompts = [SYSTEM + f"Question {i}?<|im_end|>\n<|im_start|>assistant\n" for i in range(3)]
    scored = {v: _scored(tmp_path, v, prompts) for v in ("base", "tuned")}
    outputs = _outputs(tmp_path)
    write_report(
        "sweep-r8", _inputs(tmp_path, {v: s[0] for v, s in scored.items()}, {v: s[1] for v, s in scored.items()}), outputs
    )
    return outputs


def test_the_data_tables_have_titles_and_say_what_their_rows_count(report):
    for text in (report.data_table.read_text(), report.markdown.read_text()):
        assert all(title in text for title in ("Sources", "Filters and mixing", "Splits"))
        assert "a multi-turn conversation is one record" in text and "one per assistant turn" in text


def test_the_samples_show_the_prompts_shared_start_once(report):
    samples = report.sample_generations.read_text()
    assert samples.count("You are a helpful assistant.") == 1
    assert "Question 0?" in samples and "Question 2?" in samples


def test_every_figure_names_its_experiment(tmp_path, monkeypatch):
    titles = []
    save = sftpipe.report._save_figure

    def recorded(fig, path, title=""):
        save(fig, path, title)
        titles.append(fig._suptitle.get_text() if fig._suptitle else "")

    monkeypatch.setattr(sftpipe.report, "_save_figure", recorded)
    prompts = ["a\nb", "a\nc"]
    scored = {v: _scored(tmp_path, v, prompts) for v in ("base", "tuned")}
    inputs = _inputs(tmp_path, {v: s[0] for v, s in scored.items()}, {v: s[1] for v, s in scored.items()})
    write_report("sweep-r8", inputs, _outputs(tmp_path))
    assert titles == ["sweep-r8"] * 3


def _rst_warnings(text: str) -> str:
    """What docutils complains about when Snakemake's report renders `text`."""
    stream = io.StringIO()
    publish_parts(text, writer="html", settings_overrides={"warning_stream": stream, "report_level": 2})
    return stream.getvalue()


class _Snakemake:
    def __init__(self, config, experiment=None):
        self.config = config
        self.wildcards = {"experiment": experiment} if experiment else {}


@pytest.mark.parametrize(
    "config",
    [
        {"experiment": "demo", "base_model": {"name": "smollm2-135m-instruct"}},
        {"experiments": {"r8_": {}, "r32": {}}, "base_model": {"name": "smollm2-135m-instruct"}},
    ],
    ids=["one experiment", "sweep"],
)
def test_the_report_pages_name_their_experiments_in_a_sweep_too(config):
    """report/workflow.rst and every caption render as Snakemake renders them (jinja2, then docutils)
    without a warning, naming the experiments."""
    names = list(config.get("experiments") or [config["experiment"]])
    workflow = jinja2.Template((REPO / "report" / "workflow.rst").read_text()).render(snakemake=_Snakemake(config))
    assert all(f"``{name}``" in workflow for name in names) and "****" not in workflow
    assert not _rst_warnings(workflow)
    rules = (REPO / "rules" / "report.smk").read_text()
    for caption in sorted((REPO / "report").glob("*.rst")):
        if caption.name == "workflow.rst":
            continue
        assert f'caption="../report/{caption.name}"' in rules, caption.name
        rendered = jinja2.Template(caption.read_text()).render(snakemake=_Snakemake(config, names[0]))
        assert not _rst_warnings(rendered), caption.name
        if caption.name != "experiments.rst":
            assert f"``{names[0]}``" in rendered, caption.name


def test_the_report_rules_label_each_artifact_with_its_experiment():
    rules = (REPO / "rules" / "report.smk").read_text()
    # Snakemake's report lists each artifact by its labels: without them, seven files of one name per experiment.
    assert rules.count('"experiment": "{experiment}"') == rules.count("results/report/{experiment}/") == 7
