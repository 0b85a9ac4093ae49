"""Report stage: base vs tuned on every metric, with the data and training behind them.

Writes a markdown summary for the terminal, a JSON summary, and the figures and tables that
`snakemake --report` puts into the HTML report.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import read_history
from .io import PipelineError, atomic_path, read_json, read_jsonl, write_json
from .metrics import EXACT_MATCH_METRICS
from .significance import BOOTSTRAP_SAMPLES, mcnemar_exact, paired_bootstrap
from .tracking import log_evaluation

VARIANTS = ("base", "tuned")
# The exported GGUF model, scored by exact match only, where the config exports one.
EXPORTED = "exported"
SAMPLE_GENERATIONS = 25
SPLIT_HEADERS = ["split", "rows", "tokens", "truncated", "dropped (too long)"]


@dataclass(frozen=True)
class ReportInputs:
    lm_eval: dict[str, str | Path]  # variant -> lm_eval.json
    exact_match: dict[str, str | Path]  # variant (and EXPORTED, where exported) -> exact_match.json
    predictions: dict[str, str | Path]  # the same variants -> predictions.jsonl
    history: str | Path
    data_stats: str | Path
    filters: str | Path
    manifests: list[str | Path]


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
    """One row per task and metric: base and tuned values, their stderr, the delta and the settings."""
    rows = []
    for task in sorted(results["base"]["tasks"]):
        base, tuned = results["base"]["tasks"][task], results["tuned"]["tasks"][task]
        for key, value in sorted(base["metrics"].items()):
            metric, comma, filter_name = key.partition(",")
            # Metric keys read "<metric>,<filter>"; others ("name", "sample_len") describe the run.
            if not comma or metric.endswith("_stderr"):
                continue
            stderr_key = f"{metric}_stderr,{filter_name}"
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "base": value,
                    "base_stderr": base["metrics"].get(stderr_key),
                    "tuned": tuned["metrics"][key],
                    "tuned_stderr": tuned["metrics"].get(stderr_key),
                    "delta": tuned["metrics"][key] - value,
                    "samples": base["n_samples"]["effective"],
                    "num_fewshot": base["settings"]["num_fewshot"],
                    "apply_chat_template": base["settings"].get("apply_chat_template", False),
                    "data": base["data"],
                }
            )
    return rows


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def _fmt_p(value: float | None) -> str:
    return "" if value is None else f"{value:.2g}"


def _exact_match_cells(row: dict[str, Any]) -> list[str]:
    cells = [row["metric"], f"{row['base']:.4f}", f"{row['tuned']:.4f}", f"{row['delta']:+.4f}"]
    return cells + ([f"{row[EXPORTED]:.4f}", f"{row['exported_delta']:+.4f}"] if EXPORTED in row else [])


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


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


def _save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        # Fixed metadata keeps the PNG bytes a function of the data alone.
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_loss_curves(log_history: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "training"), ("eval_loss", "validation")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def plot_eval_comparison(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Grouped bars, base vs tuned, with lm-eval's standard errors as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.38
    for offset, variant in ((-width / 2, "base"), (width / 2, "tuned")):
        errors = [r.get(f"{variant}_stderr") or 0.0 for r in rows]
        ax.bar([i + offset for i in range(len(rows))], [r[variant] for r in rows], width, yerr=errors, capsize=3, label=variant)
    ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def plot_token_lengths(stats: dict[str, Any], path: str | Path) -> None:
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
    _save_figure(fig, path)


def significance(predictions: dict[str, list[dict[str, Any]]], harness: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Base vs tuned on the same items: for each exact-match metric over the held-out rows and each
    lm-eval metric over the task's documents, the paired bootstrap's delta, its 95% interval and
    p-value; for the right/wrong ones, McNemar's exact p-value too."""
    rows = []
    base, tuned = predictions["base"], predictions["tuned"]
    if [r["id"] for r in base] != [r["id"] for r in tuned]:
        raise PipelineError("the base and tuned predictions are not of the same held-out rows")
    for metric in EXACT_MATCH_METRICS:
        scores = {v: [float(r[metric]) for r in predictions[v]] for v in VARIANTS}
        row = {"task": "exact match", "metric": metric, "items": len(base), **paired_bootstrap(scores["base"], scores["tuned"])}
        if metric != "token_f1":
            row["mcnemar_p_value"] = mcnemar_exact([bool(x) for x in scores["base"]], [bool(x) for x in scores["tuned"]])[
                "p_value"
            ]
        rows.append(row)
    for task in sorted(harness["base"]["tasks"]):
        documents = {v: harness[v]["tasks"][task]["per_document"] for v in VARIANTS}
        if documents["base"]["doc_id"] != documents["tuned"]["doc_id"]:
            raise PipelineError(f"lm-eval task '{task}': the base and tuned models were scored on different documents")
        for metric in (m for m in documents["base"] if m != "doc_id"):
            paired = paired_bootstrap(documents["base"][metric], documents["tuned"][metric])
            rows.append({"task": task, "metric": metric, "items": len(documents["base"]["doc_id"]), **paired})
    return rows


def write_report(
    experiment: str, inputs: ReportInputs, outputs: ReportOutputs, setup: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write every report artifact; return the JSON summary. `setup` records the experiment's
    datasets, base model and training settings (see `Experiment.describe`)."""
    harness = {v: read_json(inputs.lm_eval[v]) for v in VARIANTS}
    em = {v: read_json(path) for v, path in inputs.exact_match.items()}
    exported = EXPORTED in em
    training, log_history = read_history(inputs.history)
    stats = read_json(inputs.data_stats)
    filters = read_json(inputs.filters)
    manifests = [read_json(p) for p in inputs.manifests]
    lm_rows = lm_eval_rows(harness)
    em_rows = [
        {"metric": key, "base": em["base"][key], "tuned": em["tuned"][key], "delta": em["tuned"][key] - em["base"][key]}
        | ({EXPORTED: em[EXPORTED][key], "exported_delta": em[EXPORTED][key] - em["tuned"][key]} if exported else {})
        for key in EXACT_MATCH_METRICS
    ]
    em_headers = ["metric", "base", "tuned", "delta"] + ([EXPORTED, "exported − tuned"] if exported else [])

    lines = [f"# sftpipe report: {experiment}", ""]
    lines += ["## Exact match on the held-out test split", ""]
    lines += [f"{em['base']['rows']} rows, greedy decoding, max_new_tokens={em['base']['settings']['max_new_tokens']}.", ""]
    if exported:
        round_trip = exported_round_trip(em[EXPORTED], inputs.predictions)
        lines += [
            f"exported: `{round_trip['gguf_file']}`, read back alone through transformers' GGUF loader; its greedy "
            f"answers are the merged model's on {round_trip['same_answers']} of {round_trip['rows']} rows.",
            "",
        ]
    lines += _markdown_table(em_headers, [_exact_match_cells(r) for r in em_rows])
    scored = [v for v in (*VARIANTS, EXPORTED) if v in em]
    lines += ["", "Per dataset (normalized exact match):", ""]
    lines += _markdown_table(
        ["dataset", "rows", *scored],
        [
            [name, base["rows"], *(f"{em[v]['per_dataset'][name]['normalized_exact_match']:.4f}" for v in scored)]
            for name, base in em["base"]["per_dataset"].items()
        ],
    )
    lines += ["", "## lm-evaluation-harness", ""]
    lines += [
        "| task | metric | base | tuned | delta | samples | few-shot | chat template | data |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['metric']} | {_fmt(r['base'], r['base_stderr'])} | {_fmt(r['tuned'], r['tuned_stderr'])} "
        f"| {r['delta']:+.4f} | {r['samples']} | {r['num_fewshot']} | {r['apply_chat_template']} | {r['data']} |"
        for r in lm_rows
    ]
    predictions = {v: list(read_jsonl(inputs.predictions[v])) for v in scored}
    paired = significance(predictions, harness)
    lines += ["", "## Is the difference real?", ""]
    lines += [
        f"Paired comparisons on the same items: the delta's 95% interval from {BOOTSTRAP_SAMPLES:,} bootstrap "
        "resamplings, its p-value, and McNemar's exact test for right/wrong scores.",
        "",
        "| task | metric | items | delta | 95% interval | bootstrap p | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['metric']} | {r['items']} | {r['delta']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
        f"| {r['p_value']:.2g} | {_fmt_p(r.get('mcnemar_p_value'))} |"
        for r in paired
    ]
    lines += ["", "## What the model is trained on", ""]
    lines += ["The first training row of each dataset, as tokenized: the prompt the model sees, then what it learns.", ""]
    for dataset, rows in stats["preview"].items():
        seen = "".join(s["text"] for s in rows[0] if not s["learned"])
        learned = "".join(s["text"] for s in rows[0] if s["learned"])
        lines += [f"**{dataset}**, seen:", "", "```", seen, "```", "", "learned:", "", "```", learned, "```", ""]
    lines += ["", "## Training", ""]
    lines += [
        f"- steps: {training.steps}, precision: {training.precision}, runtime: {training.train_runtime_s:.0f} s",
        f"- final train loss: {_fmt(training.train_loss)}, validation loss: {_fmt(training.eval_loss)}",
        f"- train rows: {training.train_rows}, validation rows: {training.validation_rows}",
    ]
    data_rows = [[m["name"], m["source"]["kind"], m["rows"], m["sha256"][:16]] for m in manifests]
    split_rows = [
        [split, stats[split]["rows"], stats[split]["tokens"], stats[split]["truncated"], stats[split]["dropped_too_long"]]
        for split in ("train", "validation", "test")
    ]
    lines += ["", "## Data", "", "| dataset | source | rows | sha256 |", "|---|---|---|---|"]
    lines += [f"| {n} | {k} | {r} | `{h}` |" for n, k, r, h in data_rows]
    filter_headers = [
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
    filter_rows = [
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
        for name, f in filters["datasets"].items()
    ]
    lines += ["", *_markdown_table(filter_headers, filter_rows)]
    lines += ["", *_markdown_table(SPLIT_HEADERS, split_rows)]
    _write_text(outputs.markdown, "\n".join(lines) + "\n")

    plot_loss_curves(log_history, outputs.loss_curves)
    em_as_rows = [{"task": "exact match", "metric": r["metric"], "base": r["base"], "tuned": r["tuned"]} for r in em_rows]
    plot_eval_comparison(em_as_rows + lm_rows, outputs.eval_comparison)
    plot_token_lengths(stats, outputs.token_lengths)
    em_table = [_exact_match_cells(r) for r in em_rows]
    _write_text(outputs.exact_match_table, _html_page(_html_table(em_headers, em_table)))
    samples = [
        [rows[0]["id"], rows[0]["prompt"], rows[0]["reference"], *(r["prediction"] for r in rows)]
        for rows in zip(*(predictions[v][:SAMPLE_GENERATIONS] for v in scored), strict=True)
    ]
    _write_text(outputs.sample_generations, _html_page(_html_table(["id", "prompt", "reference", *scored], samples)))
    _write_text(outputs.training_rows, training_rows_html(stats["preview"]))
    _write_text(
        outputs.data_table,
        _html_page(
            _html_table(["dataset", "source", "rows", "sha256"], data_rows),
            _html_table(filter_headers, filter_rows),
            _html_table(SPLIT_HEADERS, split_rows),
        ),
    )
    summary = {
        "experiment": experiment,
        "setup": setup or {},
        "exact_match": em_rows,
        "lm_eval": lm_rows,
        "significance": paired,
        **({EXPORTED: round_trip} if exported else {}),
        "training": training.to_json(),
    }
    write_json(outputs.summary, summary)
    log_evaluation(training.tracking, training.steps, tracked_figures(em_rows, lm_rows))
    return summary


def exported_round_trip(metrics: dict[str, Any], predictions: dict[str, str | Path]) -> dict[str, Any]:
    """The exported file read back, against the merged model it came from: how many held-out rows
    get the same greedy answer from both."""
    pairs = zip(read_jsonl(predictions[EXPORTED]), read_jsonl(predictions["tuned"]), strict=True)
    same = 0
    for exported, tuned in pairs:
        if exported["id"] != tuned["id"]:
            raise PipelineError("the exported and tuned predictions are not of the same held-out rows")
        same += exported["prediction"] == tuned["prediction"]
    return {"gguf_file": metrics["settings"]["gguf_file"], "rows": metrics["rows"], "same_answers": same}


def tracked_figures(em_rows: list[dict[str, Any]], lm_rows: list[dict[str, Any]]) -> dict[str, float]:
    """The evaluation figures a tracker gets, base and tuned (and exported), named `eval/<task>/<metric>/<variant>`."""
    rows = [{**r, "task": "exact_match"} for r in em_rows] + lm_rows
    return {
        f"eval/{r['task']}/{r['metric']}/{variant}": float(r[variant])
        for r in rows
        for variant in (*VARIANTS, EXPORTED)
        if variant in r
    }


def comparison_rows(experiments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per experiment: what sets it apart (the training settings that vary across the sweep)
    and its headline figures."""
    settings = [e["setup"].get("train", {}) for e in experiments]
    varying = sorted({k for s in settings for k in s if len({repr(t.get(k)) for t in settings}) > 1})
    rows = []
    for e, train in zip(experiments, settings, strict=True):
        em = {r["metric"]: r for r in e["exact_match"]}
        rows.append(
            {
                "experiment": e["experiment"],
                "base_model": e["setup"].get("base_model", {}).get("name"),
                "datasets": e["setup"].get("datasets"),
                "train": {k: train.get(k) for k in varying},
                "train_loss": e["training"]["train_loss"],
                "eval_loss": e["training"]["eval_loss"],
                "exact_match": {
                    v: em["normalized_exact_match"][v] for v in (*VARIANTS, EXPORTED) if v in em["normalized_exact_match"]
                },
                "lm_eval": {f"{r['task']} {r['metric']}": {v: r[v] for v in VARIANTS} for r in e["lm_eval"]},
            }
        )
    return rows


def write_summary(report_summaries: list[str | Path], out_path: str | Path, comparison_path: str | Path) -> dict[str, Any]:
    """`results/summary.json` and an HTML table for the report: every experiment's figures side by side."""
    experiments = [read_json(p) for p in report_summaries]
    rows = comparison_rows(experiments)
    metrics = sorted({m for r in rows for m in r["lm_eval"]})
    headers = ["experiment", "base model", "datasets", "settings", "train loss", "validation loss", "exact match", *metrics]

    def base_to_tuned(pair: dict[str, float] | None) -> str:
        if pair is None:
            return "n/a"
        return f"{pair['base']:.4f} → {pair['tuned']:.4f}" + (f" (exported {pair[EXPORTED]:.4f})" if EXPORTED in pair else "")

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
        ]
        for r in rows
    ]
    _write_text(comparison_path, _html_page(_html_table(headers, table)))
    summary = {"comparison": rows, "experiments": {e["experiment"]: e for e in experiments}}
    write_json(out_path, summary)
    return summary
