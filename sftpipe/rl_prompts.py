"""RL's prompts: the training-split rows of the datasets `rl.datasets` names, as the SFT data stages
left them (hydrated, filtered, mixed and split), each with its reference answer. Only the training
split is read, so no held-out row ever reaches RL. Plain Python: no tokenizer is needed, since the
rows are the very ones SFT tokenized."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from .io import PipelineError, read_jsonl, write_json, write_jsonl

log = logging.getLogger("sftpipe")


def write_rl_prompts(train_path: str | Path, datasets: list[str], prompts_path: str | Path, stats_path: str | Path) -> dict:
    """Write the prompts (`id`, `dataset`, `source_id`, `prompt`, `reference`) and their counts per dataset."""
    wanted = set(datasets)
    rows = [
        {
            "id": row["id"],
            "dataset": row["dataset"],
            "source_id": row.get("source_id", row["id"]),
            "prompt": row["prompt"],
            "reference": row["completion"],
        }
        for row in read_jsonl(train_path)
        if row["dataset"] in wanted
    ]
    if not rows:
        raise PipelineError(f"config key 'rl.datasets': {train_path} holds no training rows of {', '.join(sorted(wanted))}")
    write_jsonl(prompts_path, rows)
    stats = {"rows": len(rows), "datasets": dict(sorted(Counter(r["dataset"] for r in rows).items())), "split": "train"}
    write_json(stats_path, stats)
    log.info("RL prompts: %d training rows (%s)", len(rows), stats["datasets"])
    return stats
