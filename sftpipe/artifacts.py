"""The contracts of artifacts one stage writes and others read, by name rather than by string key.
Plain Python, so the report reads them without torch."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .io import read_json, write_json


@dataclass(frozen=True)
class TrainSummary:
    """The `summary` of a training run's `history.json`, beside the trainer's `log_history`."""

    train_loss: float
    eval_loss: float | None
    eval_perplexity: float | None
    steps: int  # the optimizer step the adapter was saved at
    steps_run: int  # optimizer steps this run performed: after a resume, only the remaining ones
    resumed_from_step: int
    train_runtime_s: float
    train_tokens: int  # real (non-pad) tokens this run trained on, over all processes
    train_tokens_per_s: float
    projected_positions: int  # positions this run projected onto the vocabulary, over all processes
    train_rows: int
    validation_rows: int
    precision: str
    attention: str
    world_size: int
    allocator: str
    settings: dict[str, Any]
    tracking: dict[str, Any]  # where the run is tracked (sftpipe.tracking), for the evaluation to log to

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_history(path: str | os.PathLike, summary: TrainSummary, log_history: list[dict[str, Any]]) -> None:
    write_json(path, {"summary": summary.to_json(), "log_history": log_history})


def read_history(path: str | os.PathLike) -> tuple[TrainSummary, list[dict[str, Any]]]:
    history = read_json(path)
    return TrainSummary(**history["summary"]), history["log_history"]
