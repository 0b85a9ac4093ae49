"""Report stage: base vs tuned on every metric, with the data and training behind them; for an
experiment tuned on preferences, the preference-tuned model beside them and its held-out rewards.

Writes a markdown summary for the terminal, a JSON summary, and the figures and tables that
`snakemake --report` puts into the HTML report.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import TrainSummary, read_history
from .io import PipelineError, atomic_path, read_json, read_jsonl, write_json
from .metrics import EXACT_MATCH_METRICS
from .significance import BOOTSTRAP_SAMPLES, mcnemar_exact, paired_bootstrap
from .tracking import log_evaluation

# The models an experiment evaluates: the base model, after SFT (tuned), and after SFT and
# preference tuning (preference) or online RL (rl), for experiments that have it.
VARIANTS = ("base", "tuned", "preference", "rl")
# The exported GGUF model (the SFT model as served), scored by exact match only, where the config exports one.
EXPORTED = "exported"
# Each variant's delta is over the model it came from: (that model, the delta's key); RL after
# preference tuning came from the preference-tuned model (see `origin`).
DELTAS = {
    "tuned": ("base", "delta"),
    "preference": ("tuned", "preference_delta"),
    "rl": ("tuned", "rl_delta"),
    EXPORTED: ("tuned", "exported_delta"),
}
# The RL curves the report summarizes, as TRL logs them (besides each reward's mean and std).
RL_CURVES = ("reward", "reward_std", "kl", "completions/mean_length", "frac_reward_zero_std", "clip_ratio/region_mean")
SAMPLE_GENERATIONS = 25


def origin(variant: str, variants) -> str:
    """The model `variant` came from, which its delta and its paired tests are over, among `variants`."""
    if variant == "rl" and "preference" in variants:
        return "preference"
    return DELTAS[variant][0]


@dataclass(frozen=True)
class PreferenceInputs:
    rewards: str | Path  # the held-out pairs' rewards (sftpipe.reference.evaluate_preference)
    history: str | Path  # the preference run's history.json
    stats: str | Path  # the tokenized pairs' stats.json


@dataclass(frozen=True)
class RLInputs:
    history: str | Path  # the RL run's history.json
    prompts: str | Path  # the prompts' counts (sftpipe.rl_prompts)


@dataclass(frozen=True)
class ReportInputs:
    lm_eval: dict[str, str | Path]  # variant -> lm_eval.json
    exact_match: dict[str, str | Path]  # variant (and EXPORTED, where exported) -> exact_match.json
    predictions: dict[str, str | Path]  # the same variants -> predictions.jsonl
    history: str | Path
    data_stats: str | Path
    filters: str | Path
    manifests: list[str | Path]
    preference: PreferenceInputs | None = None
    rl: RLInputs | None = None

    @property
    def variants(self) -> tuple[str, ...]:
        """The models scored by exact match and lm-eval."""
        return tuple(v for v in VARIANTS if v in self.exact_match)

    @property
    def scored(self) -> tuple[str, ...]:
        """The models scored by exact match: the variants, and the exported file where there is one."""
        return self.variants + ((EXPORTED,) if EXPORTED in self.exact_match else ())


@dataclass(frozen=True)
class ReportOutputs:
    markdown: str | Path
    summary: str | Path
    loss_curves: str | Path
    eval_comparison: str | Path
    token_lengths: str | Path
    exact_match_table: str | Path
    sample_generations: str | Path
    data_table: str | Path
    training_rows: str | Path


def lm_eval_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task and metric: each variant's value and stderr, the delta of each over the one
    before it (tuned over base, preference over tuned), and the settings."""
    variants = [v for v in VARIANTS if v in results]
    rows = []
    for task in sorted(results["base"]["tasks"]):
        base = results["base"]["tasks"][task]
        for key in sorted(base["metrics"]):
            metric, comma, filter_name = key.partition(",")
            # Metric keys read "<metric>,<filter>"; others ("name", "sample_len") describe the run.
            if not comma or metric.endswith("_stderr"):
                continue
            stderr_key = f"{metric}_stderr,{filter_name}"
            row = {"task": task, "metric": metric}
            for variant in variants:
                metrics = results[variant]["tasks"][task]["metrics"]
                row |= {variant: metrics[key], f"{variant}_stderr": metrics.get(stderr_key)}
            row |= _deltas(row, variants)
            row |= {
                "samples": base["n_samples"]["effective"],
                "num_fewshot": base["settings"]["num_fewshot"],
                "apply_chat_template": base["settings"].get("apply_chat_template", False),
                "data": base["data"],
            }
            rows.append(row)
    return rows


def _deltas(row: dict[str, Any], variants: list[str]) -> dict[str, float]:
    """`delta`: tuned minus base; `preference_delta`, `rl_delta` and `exported_delta`: that model minus
    the one it came from."""
    return {DELTAS[v][1]: row[v] - row[origin(v, variants)] for v in variants if v in DELTAS}


def _delta_headers(variants: tuple[str, ...]) -> list[str]:
    """The columns after `metric`: each variant, then its delta over the model it came from."""
    headers = ["base"]
    for variant in variants[1:]:
        headers += [variant, "delta" if variant == "tuned" else f"delta vs {origin(variant, variants)}"]
    return headers


def _value_keys(variants: tuple[str, ...]) -> list[str]:
    """The row keys of `_delta_headers`' columns."""
    return ["base", *(key for v in variants[1:] for key in (v, DELTAS[v][1]))]


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def _fmt_p(value: float | None) -> str:
    return "" if value is None else f"{value:.2g}"


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td><pre>{html.escape(str(c))}</pre></td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_page(*tables: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "pre{white-space:pre-wrap;margin:0;max-width:40em}.prompt{color:#555}.learned{background:#c8f0c8}</style></head>"
        f"<body>{''.join(tables)}</body></html>\n"
    )


def training_rows_html(preview: dict[str, list[list[dict[str, Any]]]]) -> str:
    """Each dataset's first training rows as training tokenized them: the tokens the model sees in
    grey, those it learns highlighted (EOS included; special tokens shown)."""
    blocks = []
    for dataset, rows in preview.items():
        blocks.append(f"<h3>{html.escape(dataset)}</h3>")
        for segments in rows:
            spans = "".join(
                f"<span class='{'learned' if s['learned'] else 'prompt'}'>{html.escape(s['text'])}</span>" for s in segments
            )
            blocks.append(f"<pre>{spans}</pre><hr>")
    return _html_page(*blocks)


def _write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _save_figure(fig, path: str | Path, title: str = "") -> None:
    """`title` names the experiment: a figure saved or shared alone still says which run it shows."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
        fig.tight_layout()
    with atomic_path(path) as tmp:
        # Fixed metadata keeps the PNG bytes a function of the data alone.
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_loss_curves(
    log_history: list[dict[str, Any]], path: str | Path, preference: list[dict[str, Any]] | None = None, title: str = ""
) -> None:
    """SFT's losses; beside them, for an experiment tuned on preferences, the preference loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = [("SFT", "loss (completion tokens)", log_history)]
    if preference is not None:
        histories.append(("preference tuning", "preference loss", preference))
    fig, axes = plt.subplots(1, len(histories), figsize=(7 * len(histories), 4), squeeze=False)
    for ax, (stage, ylabel, history) in zip(axes[0], histories, strict=True):
        for key, label in (("loss", "training"), ("eval_loss", "validation")):
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if preference is not None:
            ax.set_title(stage)
        ax.legend()
        ax.grid(alpha=0.3)
    _save_figure(fig, path, title)


def plot_eval_comparison(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Grouped bars, base vs tuned, with lm-eval's standard errors as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    variants = [v for v in VARIANTS if v in rows[0]]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.76 / len(variants)
    for k, variant in enumerate(variants):
        offset = (k - (len(variants) - 1) / 2) * width
        errors = [r.get(f"{variant}_stderr") or 0.0 for r in rows]
        ax.bar([i + offset for i in range(len(rows))], [r[variant] for r in rows], width, yerr=errors, capsize=3, label=variant)
    ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path, title)


def plot_token_lengths(stats: dict[str, Any], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = stats["settings"]["histogram_bin_width"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("train", "validation", "test"):
        histogram = {int(k): v for k, v in stats[split]["length_histogram"].items()}
        if histogram:
            ax.bar(list(histogram), list(histogram.values()), width=width, align="edge", alpha=0.5, label=split)
    ax.set_xlabel(f"tokens per example (bins of {width})")
    ax.set_ylabel("examples")
    ax.legend()
    _save_figure(fig, path, title)


def significance(
    predictions: dict[str, list[dict[str, Any]]],
    harness: dict[str, dict[str, Any]],
    before: str = "base",
    after: str = "tuned",
) -> list[dict[str, Any]]:
    """`before` vs `after` (base vs tuned, or tuned vs preference) on the same items: for each
    exact-match metric over the held-out rows and each lm-eval metric over the task's documents, the
    paired bootstrap's delta, its 95% interval and p-value; for the right/wrong ones, McNemar's exact
    p-value too."""
    rows = []
    first, second = predictions[before], predictions[after]
    if [r["id"] for r in first] != [r["id"] for r in second]:
        raise PipelineError(f"the {before} and {after} predictions are not of the same held-out rows")
    compared = {} if (before, after) == ("base", "tuned") else {"compared": f"{after} vs {before}"}
    for metric in EXACT_MATCH_METRICS:
        scores = {v: [float(r[metric]) for r in predictions[v]] for v in (before, after)}
        row = {"task": "exact match", "metric": metric, "items": len(first), **compared}
        row |= paired_bootstrap(scores[before], scores[after])
        if EXACT_MATCH_METRICS[metric].right_or_wrong:
            row["mcnemar_p_value"] = mcnemar_exact([bool(x) for x in scores[before]], [bool(x) for x in scores[after]])["p_value"]
        rows.append(row)
    for task in sorted(harness[before]["tasks"]):
        documents = {v: harness[v]["tasks"][task]["per_document"] for v in (before, after)}
        if documents[before]["doc_id"] != documents[after]["doc_id"]:
            raise PipelineError(f"lm-eval task '{task}': the {before} and {after} models were scored on different documents")
        for metric in (m for m in documents[before] if m != "doc_id"):
            paired = paired_bootstrap(documents[before][metric], documents[after][metric])
            rows.append({"task": task, "metric": metric, "items": len(documents[before]["doc_id"]), **compared, **paired})
    return rows


@dataclass(frozen=True)
class Report:
    """Everything the report shows, read from the stage's inputs once."""

    experiment: str
    variants: tuple[str, ...]  # scored by exact match and lm-eval
    scored: tuple[str, ...]  # scored by exact match: the variants, and the exported file where there is one
    exact_match: dict[str, dict[str, Any]]  # scored variant -> its exact_match.json
    em_rows: list[dict[str, Any]]  # one per exact-match metric: each scored variant's value and deltas
    lm_rows: list[dict[str, Any]]  # see lm_eval_rows
    paired: list[dict[str, Any]]  # see significance
    predictions: dict[str, list[dict[str, Any]]]  # scored variant -> its predictions, in held-out order
    training: TrainSummary
    log_history: list[dict[str, Any]]
    stats: dict[str, Any]  # the tokenized split's stats.json
    filters: dict[str, Any]  # the mix's .filters.json
    manifests: list[dict[str, Any]]  # each dataset's download manifest
    round_trip: dict[str, Any] | None  # see exported_round_trip, where the config exports
    preference: dict[str, Any] | None  # see preference_summary, where the experiment tunes on preferences
    preference_history: list[dict[str, Any]] | None
    rl: dict[str, Any] | None  # see rl_summary, where the experiment tunes with online RL


def exact_match_rows(em: dict[str, dict[str, Any]], scored: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per registered exact-match metric: each scored variant's value and its deltas."""
    rows = []
    for key in EXACT_MATCH_METRICS:
        row = {"metric": key, **{v: em[v][key] for v in scored}}
        rows.append(row | _deltas(row, list(scored)))
    return rows


def read_report(experiment: str, inputs: ReportInputs) -> Report:
    variants, scored = inputs.variants, inputs.scored
    harness = {v: read_json(inputs.lm_eval[v]) for v in variants}
    em = {v: read_json(inputs.exact_match[v]) for v in scored}
    predictions = {v: list(read_jsonl(inputs.predictions[v])) for v in scored}
    paired = significance(predictions, harness)
    if "preference" in variants:
        paired += significance(predictions, harness, "tuned", "preference")
    if "rl" in variants:
        paired += significance(predictions, harness, origin("rl", variants), "rl")
    training, log_history = read_history(inputs.history)
    return Report(
        experiment=experiment,
        variants=variants,
        scored=scored,
        exact_match=em,
        em_rows=exact_match_rows(em, scored),
        lm_rows=lm_eval_rows(harness),
        paired=paired,
        predictions=predictions,
        training=training,
        log_history=log_history,
        stats=read_json(inputs.data_stats),
        filters=read_json(inputs.filters),
        manifests=[read_json(p) for p in inputs.manifests],
        round_trip=exported_round_trip(em[EXPORTED], predictions) if EXPORTED in em else None,
        preference=preference_summary(inputs.preference) if inputs.preference else None,
        preference_history=read_history(inputs.preference.history)[1] if inputs.preference else None,
        rl=rl_summary(inputs.rl) if inputs.rl else None,
    )


def write_report(
    experiment: str, inputs: ReportInputs, outputs: ReportOutputs, setup: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write every report artifact; return the JSON summary. `setup` records the experiment's
    datasets, base model and training settings (see `Experiment.describe`)."""
    report = read_report(experiment, inputs)
    _write_text(outputs.markdown, markdown_report(report))
    write_figures(report, outputs)
    write_html_pages(report, outputs)
    summary = report_summary(report, setup)
    write_json(outputs.summary, summary)
    log_evaluation(report.training.tracking, report.training.steps, tracked_figures(report.em_rows, report.lm_rows))
    return summary


def report_summary(report: Report, setup: dict[str, Any] | None) -> dict[str, Any]:
    """The report's JSON: what `write_summary` sets side by side across experiments."""
    return {
        "experiment": report.experiment,
        "setup": setup or {},
        "exact_match": report.em_rows,
        "lm_eval": report.lm_rows,
        "significance": report.paired,
        **({EXPORTED: report.round_trip} if report.round_trip else {}),
        "training": report.training.to_json(),
        **({"preference": report.preference} if report.preference else {}),
        **({"rl": report.rl} if report.rl else {}),
    }


def _score(value: float, key: str) -> str:
    """A score, or a delta (`key` names which) with its sign."""
    return f"{value:+.4f}" if "delta" in key else f"{value:.4f}"


def _score_cells(row: dict[str, Any], variants: tuple[str, ...]) -> list[str]:
    """Each variant's score and delta in a row of `_delta_headers(variants)`' columns."""
    return [_score(row[key], key) for key in _value_keys(variants)]


def _lm_eval_cells(row: dict[str, Any], variants: tuple[str, ...]) -> list[str]:
    """As `_score_cells`, each score with lm-eval's standard error."""
    return [_score(row[key], key) if "delta" in key else _fmt(row[key], row[f"{key}_stderr"]) for key in _value_keys(variants)]


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


def markdown_report(report: Report) -> str:
    """The report for the terminal: results/report/<experiment>.md."""
    lines = [f"# sftpipe report: {report.experiment}", ""]
    for section in (_exact_match_lines, _lm_eval_lines, _significance_lines, _trained_on_lines, _training_lines):
        lines += section(report)
    if report.preference:
        lines += ["", *preference_lines(report.preference)]
    if report.rl:
        lines += ["", *rl_lines(report.rl)]
    lines += _data_lines(report)
    return "\n".join(lines) + "\n"


def _rl_origin_words(variants: tuple[str, ...]) -> str:
    return "SFT, preference tuning and then" if origin("rl", variants) == "preference" else "SFT and then"


def _exact_match_lines(report: Report) -> list[str]:
    em, scored = report.exact_match, report.scored
    lines = ["## Exact match on the held-out test split", ""]
    lines += [f"{em['base']['rows']} rows, greedy decoding, max_new_tokens={em['base']['settings']['max_new_tokens']}.", ""]
    lines += [
        "base: the base model; tuned: after SFT"
        + ("; preference: after SFT and then preference tuning" if "preference" in report.variants else "")
        + (
            f"; rl: after {_rl_origin_words(report.variants)} online RL (GRPO) on training prompts"
            if "rl" in report.variants
            else ""
        )
        + ".",
        "",
    ]
    if round_trip := report.round_trip:
        lines += [
            f"exported: `{round_trip['gguf_file']}`, read back alone through transformers' GGUF loader; its greedy "
            f"answers are the merged model's on {round_trip['same_answers']} of {round_trip['rows']} rows.",
            "",
        ]
    lines += _markdown_table(
        ["metric", *_delta_headers(scored)], [[r["metric"], *_score_cells(r, scored)] for r in report.em_rows]
    )
    per_dataset = [
        [name, base["rows"], *(f"{em[v]['per_dataset'][name]['normalized_exact_match']:.4f}" for v in scored)]
        for name, base in em["base"]["per_dataset"].items()
    ]
    return lines + ["", "Per dataset (normalized exact match):", "", *_markdown_table(["dataset", "rows", *scored], per_dataset)]


def _lm_eval_lines(report: Report) -> list[str]:
    headers = ["task", "metric", *_delta_headers(report.variants), "samples", "few-shot", "chat template", "data"]
    rows = [
        [
            r["task"],
            r["metric"],
            *_lm_eval_cells(r, report.variants),
            r["samples"],
            r["num_fewshot"],
            r["apply_chat_template"],
            r["data"],
        ]
        for r in report.lm_rows
    ]
    return ["", "## lm-evaluation-harness", "", *_markdown_table(headers, rows)]


def _significance_lines(report: Report) -> list[str]:
    rows = [
        [
            r["task"] + (f" ({r['compared']})" if "compared" in r else ""),
            r["metric"],
            r["items"],
            f"{r['delta']:+.4f}",
            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
            f"{r['p_value']:.2g}",
            _fmt_p(r.get("mcnemar_p_value")),
        ]
        for r in report.paired
    ]
    return [
        "",
        "## Is the difference real?",
        "",
        f"Paired comparisons on the same items: the delta's 95% interval from {BOOTSTRAP_SAMPLES:,} bootstrap "
        "resamplings, its p-value, and McNemar's exact test for right/wrong scores.",
        "",
        *_markdown_table(["task", "metric", "items", "delta", "95% interval", "bootstrap p", "McNemar p"], rows),
    ]


def _trained_on_lines(report: Report) -> list[str]:
    lines = ["", "## What the model is trained on", ""]
    lines += ["The first training row of each dataset, as tokenized: the prompt the model sees, then what it learns.", ""]
    for dataset, rows in report.stats["preview"].items():
        seen = "".join(s["text"] for s in rows[0] if not s["learned"])
        learned = "".join(s["text"] for s in rows[0] if s["learned"])
        lines += [f"**{dataset}**, seen:", "", "```", seen, "```", "", "learned:", "", "```", learned, "```", ""]
    return lines


def _training_lines(report: Report) -> list[str]:
    training = report.training
    return [
        "",
        "## Training",
        "",
        f"- steps: {training.steps}, precision: {training.precision}, runtime: {training.train_runtime_s:.0f} s",
        f"- final train loss: {_fmt(training.train_loss)}, validation loss: {_fmt(training.eval_loss)}",
        f"- train rows: {training.train_rows}, validation rows: {training.validation_rows}",
    ]


# The three data tables, each with its title and what its row counts count: a multi-turn
# conversation is one downloaded record but one training example per assistant turn.
SOURCES = ("Sources", "rows: records as downloaded (a multi-turn conversation is one record).")
FILTERS = (
    "Filters and mixing",
    "rows in: examples after hydration, one per assistant turn (a conversation with three answers counts three); "
    "each filter's column counts the examples it removed.",
)
SPLITS = ("Splits", "rows: tokenized examples per split, after the filters, mixing and the length limits.")
FILTER_HEADERS = [
    "dataset",
    "rows in",
    "exact dup",
    "near dup",
    "eval contamination",
    "test overlap",
    "after filters",
    "weight",
    "rows out",
]
SPLIT_HEADERS = ["split", "rows", "tokens", "truncated", "dropped (too long)"]
SPLIT_NAMES = ("train", "validation", "test")


def data_tables(report: Report) -> list[tuple[tuple[str, str], list[str], list[list[Any]]]]:
    """((title, what its rows count), headers, rows) of the sources, filters and splits tables."""
    sources = [[m["name"], m["source"]["kind"], m["rows"], m["sha256"][:16]] for m in report.manifests]
    filters = [
        [
            name,
            f["rows_in"],
            f["exact_duplicate"],
            f["near_duplicate"],
            f["eval_contamination"],
            f["test_overlap"],
            f["rows_after_filters"],
            f["weight"] if f["weight"] is not None else "all",
            f["rows_out"],
        ]
        for name, f in report.filters["datasets"].items()
    ]
    stats = report.stats
    splits = [[s, stats[s]["rows"], stats[s]["tokens"], stats[s]["truncated"], stats[s]["dropped_too_long"]] for s in SPLIT_NAMES]
    return [
        (SOURCES, ["dataset", "source", "rows", "sha256"], sources),
        (FILTERS, FILTER_HEADERS, filters),
        (SPLITS, SPLIT_HEADERS, splits),
    ]


def _data_lines(report: Report) -> list[str]:
    lines = ["", "## Data"]
    for (title, counts), headers, rows in data_tables(report):
        if title == SOURCES[0]:
            rows = [[n, k, r, f"`{h}`"] for n, k, r, h in rows]
        lines += ["", f"### {title}", "", counts, "", *_markdown_table(headers, rows)]
    return lines


def write_figures(report: Report, outputs: ReportOutputs) -> None:
    """The loss curves, the scores of every variant side by side, and the token lengths, as PNG."""
    plot_loss_curves(report.log_history, outputs.loss_curves, report.preference_history, title=report.experiment)
    em_as_rows = [{"task": "exact match", "metric": r["metric"], **{v: r[v] for v in report.variants}} for r in report.em_rows]
    plot_eval_comparison(em_as_rows + report.lm_rows, outputs.eval_comparison, title=report.experiment)
    plot_token_lengths(report.stats, outputs.token_lengths, title=report.experiment)


def shared_prompt_start(prompts: list[str]) -> str:
    """The whole lines every prompt starts with (a template's system text or preamble), or "" where
    the prompts share none: shown once above the samples rather than in every row."""
    if len(prompts) < 2:
        return ""
    common = os.path.commonprefix(prompts)
    return common[: common.rfind("\n") + 1]


def sample_generations_html(report: Report) -> str:
    """The first held-out prompts, their reference and every scored model's answer, side by side."""
    rows = list(zip(*(report.predictions[v][:SAMPLE_GENERATIONS] for v in report.scored), strict=True))
    start = shared_prompt_start([r[0]["prompt"] for r in rows])
    samples = [
        [r[0]["id"], ("…" if start else "") + r[0]["prompt"][len(start) :], r[0]["reference"], *(p["prediction"] for p in r)]
        for r in rows
    ]
    shared = [f"<p>Every prompt below starts with this text (shown as …):</p><pre>{html.escape(start)}</pre>"] if start else []
    return _html_page(*shared, _html_table(["id", "prompt", "reference", *report.scored], samples))


def write_html_pages(report: Report, outputs: ReportOutputs) -> None:
    """The tables `snakemake --report` shows: exact match, sample generations, training rows and data."""
    em_table = [[r["metric"], *_score_cells(r, report.scored)] for r in report.em_rows]
    _write_text(outputs.exact_match_table, _html_page(_html_table(["metric", *_delta_headers(report.scored)], em_table)))
    _write_text(outputs.sample_generations, sample_generations_html(report))
    _write_text(outputs.training_rows, training_rows_html(report.stats["preview"]))
    tables = [
        f"<h3>{html.escape(title)}</h3><p>{html.escape(counts)}</p>" + _html_table(headers, rows)
        for (title, counts), headers, rows in data_tables(report)
    ]
    _write_text(outputs.data_table, _html_page(*tables))


def tracked_figures(em_rows: list[dict[str, Any]], lm_rows: list[dict[str, Any]]) -> dict[str, float]:
    """The evaluation figures a tracker gets, each variant's (and the exported model's), named
    `eval/<task>/<metric>/<variant>`."""
    rows = [{**r, "task": "exact_match"} for r in em_rows] + lm_rows
    return {
        f"eval/{r['task']}/{r['metric']}/{variant}": float(r[variant])
        for r in rows
        for variant in (*VARIANTS, EXPORTED)
        if variant in r
    }


def exported_round_trip(metrics: dict[str, Any], predictions: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The exported file read back, against the merged model it came from: how many held-out rows
    get the same greedy answer from both."""
    pairs = zip(predictions[EXPORTED], predictions["tuned"], strict=True)
    same = 0
    for exported, tuned in pairs:
        if exported["id"] != tuned["id"]:
            raise PipelineError("the exported and tuned predictions are not of the same held-out rows")
        same += exported["prediction"] == tuned["prediction"]
    return {"gguf_file": metrics["settings"]["gguf_file"], "rows": metrics["rows"], "same_answers": same}


def preference_summary(inputs: PreferenceInputs) -> dict[str, Any]:
    """The preference stage's figures: held-out rewards, the run's training and validation figures
    as TRL logged them, and the pairs per split."""
    training, log_history = read_history(inputs.history)
    stats = read_json(inputs.stats)
    validation = [h for h in log_history if "eval_rewards/accuracies" in h]
    return {
        "held_out": read_json(inputs.rewards),
        "training": training.to_json(),
        "validation": {key.removeprefix("eval_"): value for key, value in validation[-1].items()} if validation else None,
        "pairs": {split: stats[split]["rows"] for split in ("train", "validation", "test")},
    }


def preference_lines(preference: dict[str, Any]) -> list[str]:
    """The report's preference section, in markdown."""
    held_out, training, validation = preference["held_out"], preference["training"], preference["validation"]
    settings = training["settings"]
    lines = [
        "## Preference tuning",
        "",
        (
            "The SFT adapter trained on, against the SFT model as reference"
            if settings.get("start") == "adapter"
            else "A fresh LoRA on the merged SFT model, which is also the reference"
        )
        + f"; loss {settings['loss_type']}, "
        f"beta {settings['beta']}, learning rate {settings['learning_rate']}. Pairs: "
        + ", ".join(f"{n} {split}" for split, n in preference["pairs"].items())
        + ".",
        "",
        f"Held-out pairs ({held_out['pairs']}): reward beta * (log p_tuned - log p_SFT) of the chosen reply above the "
        "rejected one's:",
        "",
        "| reward accuracy | mean margin | mean chosen reward | mean rejected reward "
        "| chosen more likely: SFT | chosen more likely: preference |",
        "|---|---|---|---|---|---|",
        f"| {held_out['reward_accuracy']:.4f} | {held_out['reward_margin']:+.4f} | {held_out['reward_chosen']:+.4f} "
        f"| {held_out['reward_rejected']:+.4f} | {held_out['reference_likelihood_accuracy']:.4f} "
        f"| {held_out['likelihood_accuracy']:.4f} |",
        "",
        f"- steps: {training['steps']}, precision: {training['precision']}, runtime: {training['train_runtime_s']:.0f} s",
        f"- final train loss: {_fmt(training['train_loss'])}, validation loss: {_fmt(training['eval_loss'])}",
    ]
    if validation:
        lines.append(
            f"- validation reward accuracy {validation['rewards/accuracies']:.4f}, margin {validation['rewards/margins']:+.4f}"
        )
    return lines


def rl_summary(inputs: RLInputs) -> dict[str, Any]:
    """The RL stage's figures: the run's summary, and each curve's first and last logged value (TRL's
    mean and std of each reward, KL, completion length, share of groups whose rewards do not spread,
    clip ratio)."""
    training, log_history = read_history(inputs.history)
    logged = [h for h in log_history if "reward" in h]
    keys = [*RL_CURVES, *sorted({k for h in logged for k in h if k.startswith("rewards/")})]
    curves = {k: {"first": logged[0][k], "last": logged[-1][k]} for k in keys if logged and k in logged[-1]}
    return {"training": training.to_json(), "curves": curves, "prompts": read_json(inputs.prompts)}


def rl_lines(rl: dict[str, Any]) -> list[str]:
    """The report's RL section, in markdown."""
    training, settings = rl["training"], rl["training"]["settings"]
    lines = [
        "## Online RL (GRPO)",
        "",
        ("The SFT adapter trained on" if settings.get("start") == "adapter" else "A fresh LoRA on the merged SFT model")
        + f"; loss {settings['loss_type']}, {settings['num_generations']} completions per prompt of up to "
        f"{settings['max_completion_length']} tokens, beta {settings['beta']}, learning rate {settings['learning_rate']}; "
        f"rewards {', '.join(r['function'] if r['kind'] == 'function' else r['kind'] for r in settings['rewards'])}. "
        f"Prompts: {rl['prompts']['rows']} training rows.",
        "",
        f"- steps: {training['steps']}, precision: {training['precision']}, runtime: {training['train_runtime_s']:.0f} s",
        "",
        "| curve | first step | last step |",
        "|---|---|---|",
    ]
    lines += [f"| {key} | {_fmt(v['first'])} | {_fmt(v['last'])} |" for key, v in rl["curves"].items()]
    return lines


def comparison_rows(experiments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per experiment: what sets it apart (the training and preference settings that vary
    across the sweep) and its headline figures."""
    settings = [
        {**e["setup"].get("train", {}), **{f"preference.{k}": v for k, v in (e["setup"].get("preference") or {}).items()}}
        for e in experiments
    ]
    varying = sorted({k for s in settings for k in s if len({repr(t.get(k)) for t in settings}) > 1})
    rows = []
    for e, train in zip(experiments, settings, strict=True):
        em = {r["metric"]: r for r in e["exact_match"]}
        variants = [v for v in VARIANTS if v in em["normalized_exact_match"]]
        rows.append(
            {
                "experiment": e["experiment"],
                "base_model": e["setup"].get("base_model", {}).get("name"),
                "datasets": e["setup"].get("datasets"),
                "train": {k: train.get(k) for k in varying},
                "train_loss": e["training"]["train_loss"],
                "eval_loss": e["training"]["eval_loss"],
                "exact_match": {
                    v: em["normalized_exact_match"][v] for v in (*variants, EXPORTED) if v in em["normalized_exact_match"]
                },
                "lm_eval": {f"{r['task']} {r['metric']}": {v: r[v] for v in variants} for r in e["lm_eval"]},
                **({"reward_accuracy": e["preference"]["held_out"]["reward_accuracy"]} if e.get("preference") else {}),
            }
        )
    return rows


def write_summary(report_summaries: list[str | Path], out_path: str | Path, comparison_path: str | Path) -> dict[str, Any]:
    """`results/summary.json` and an HTML table for the report: every experiment's figures side by side."""
    experiments = [read_json(p) for p in report_summaries]
    rows = comparison_rows(experiments)
    metrics = sorted({m for r in rows for m in r["lm_eval"]})
    rewards = any("reward_accuracy" in r for r in rows)
    headers = ["experiment", "base model", "datasets", "settings", "train loss", "validation loss", "exact match", *metrics]

    def base_to_tuned(scores: dict[str, float] | None) -> str:
        if scores is None:
            return "n/a"
        chain = " → ".join(f"{scores[v]:.4f}" for v in VARIANTS if v in scores)
        return chain + (f" (exported {scores[EXPORTED]:.4f})" if EXPORTED in scores else "")

    table = [
        [
            r["experiment"],
            r["base_model"],
            ", ".join(r["datasets"] or []),
            ", ".join(f"{k}={v}" for k, v in r["train"].items()),
            _fmt(r["train_loss"]),
            _fmt(r["eval_loss"]),
            base_to_tuned(r["exact_match"]),
            *(base_to_tuned(r["lm_eval"].get(m)) for m in metrics),
            *([_fmt(r.get("reward_accuracy"))] if rewards else []),
        ]
        for r in rows
    ]
    _write_text(comparison_path, _html_page(_html_table(headers + (["held-out reward accuracy"] if rewards else []), table)))
    summary = {"comparison": rows, "experiments": {e["experiment"]: e for e in experiments}}
    write_json(out_path, summary)
    return summary
