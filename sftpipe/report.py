"""Report stage: base vs tuned on every metric, with the data and training behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_path, read_json, write_json

VARIANTS = ("base", "tuned")


def _lm_eval_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
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
                    "data": base["data"],
                }
            )
    return rows


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def write_report(
    experiment: str,
    lm_eval: dict[str, str | Path],
    exact_match: dict[str, str | Path],
    history_path: str | Path,
    data_stats_path: str | Path,
    manifest_paths: list[str | Path],
    markdown_path: str | Path,
    summary_path: str | Path,
) -> dict[str, Any]:
    """Write the markdown summary and a JSON file with the same figures."""
    harness = {v: read_json(lm_eval[v]) for v in VARIANTS}
    em = {v: read_json(exact_match[v]) for v in VARIANTS}
    training = read_json(history_path)["summary"]
    stats = read_json(data_stats_path)
    manifests = [read_json(p) for p in manifest_paths]
    lm_rows = _lm_eval_rows(harness)
    em_rows = [
        {"metric": key, "base": em["base"][key], "tuned": em["tuned"][key], "delta": em["tuned"][key] - em["base"][key]}
        for key in ("exact_match", "normalized_exact_match")
    ]

    lines = [f"# sftpipe report: {experiment}", ""]
    lines += ["## Exact match on the held-out test split", ""]
    lines += [f"{em['base']['rows']} rows, greedy decoding, max_new_tokens={em['base']['settings']['max_new_tokens']}.", ""]
    lines += ["| metric | base | tuned | delta |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['base']:.4f} | {r['tuned']:.4f} | {r['delta']:+.4f} |" for r in em_rows]
    lines += ["", "Per dataset (normalized exact match):", "", "| dataset | rows | base | tuned |", "|---|---|---|---|"]
    for name, base in em["base"]["per_dataset"].items():
        tuned = em["tuned"]["per_dataset"][name]
        lines.append(f"| {name} | {base['rows']} | {base['normalized_exact_match']:.4f} | {tuned['normalized_exact_match']:.4f} |")
    lines += ["", "## lm-evaluation-harness", ""]
    lines += ["| task | metric | base | tuned | delta | samples | few-shot | data |", "|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['task']} | {r['metric']} | {_fmt(r['base'], r['base_stderr'])} | {_fmt(r['tuned'], r['tuned_stderr'])} "
        f"| {r['delta']:+.4f} | {r['samples']} | {r['num_fewshot']} | {r['data']} |"
        for r in lm_rows
    ]
    lines += ["", "## Training", ""]
    lines += [
        f"- steps: {training['steps']}, precision: {training['precision']}, runtime: {training['train_runtime_s']:.0f} s",
        f"- final train loss: {_fmt(training['train_loss'])}, validation loss: {_fmt(training['eval_loss'])}",
        f"- train rows: {training['train_rows']}, validation rows: {training['validation_rows']}",
    ]
    lines += ["", "## Data", "", "| dataset | source | rows | sha256 |", "|---|---|---|---|"]
    lines += [f"| {m['name']} | {m['source']['kind']} | {m['rows']} | `{m['sha256'][:16]}` |" for m in manifests]
    lines += ["", "| split | rows | tokens | truncated | dropped (too long) |", "|---|---|---|---|---|"]
    for split in ("train", "validation", "test"):
        s = stats[split]
        lines.append(f"| {split} | {s['rows']} | {s['tokens']} | {s['truncated']} | {s['dropped_too_long']} |")
    with atomic_path(markdown_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"experiment": experiment, "exact_match": em_rows, "lm_eval": lm_rows, "training": training}
    write_json(summary_path, summary)
    return summary
