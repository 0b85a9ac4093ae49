"""Experiment tracking (`train.report_to`): the training curves and, once evaluated, the evaluation
figures, in the same run of the tracker. TensorBoard and MLflow need no server: TensorBoard writes
event files, MLflow a local file store unless MLFLOW_TRACKING_URI names another; W&B logs where
`wandb login` points it. Where tracking writes is not a pipeline artifact: the rules do not declare
it, and turning tracking on or off reruns nothing."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import PipelineError

log = logging.getLogger("sftpipe")

# Tracker -> the module transformers' callback for it imports.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TRACKING_DIR = Path("results/tracking")
MLFLOW_EXPERIMENT = "sftpipe"


def parse_report_to(value: str) -> tuple[str, ...]:
    """The trackers of a `report_to` resource: comma-separated names, or `none`."""
    names = tuple(name for name in value.split(",") if name and name != "none")
    for name in names:
        if name not in TRACKERS:
            raise PipelineError(f"config key 'train.report_to': '{name}' is not one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise PipelineError(f"config key 'train.report_to': {name} is not installed (pip install {name})")
    return names


def _use_mlflow(uri: str):
    import mlflow

    # MLflow 3 asks file stores to opt in; the local one here needs no server and no database.
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return mlflow


@dataclass(frozen=True)
class Tracking:
    """Where one experiment's run is tracked."""

    report_to: tuple[str, ...]
    experiment: str
    directory: Path = TRACKING_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return (self.directory / "tensorboard" / self.experiment).resolve()

    @property
    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (self.directory / "mlruns").resolve().as_uri()

    def environment(self) -> dict[str, str]:
        """What transformers' tracking callbacks read when the trainer creates them."""
        return {"TENSORBOARD_LOGGING_DIR": str(self.tensorboard_dir)} if "tensorboard" in self.report_to else {}

    @contextlib.contextmanager
    def run(self) -> Iterator[dict[str, Any]]:
        """Track what happens inside the block; yield the record (`TrainSummary.tracking`) that lets the
        evaluation log to the same run. Transformers' callbacks log into the MLflow run started here."""
        record: dict[str, Any] = {"report_to": list(self.report_to)}
        if "tensorboard" in self.report_to:
            record["tensorboard_dir"] = str(self.tensorboard_dir)
        if "mlflow" not in self.report_to or int(os.environ.get("RANK", "0")) != 0:
            yield record
            return
        mlflow = _use_mlflow(self.mlflow_uri)
        mlflow.set_experiment(MLFLOW_EXPERIMENT)
        with mlflow.start_run(run_name=self.experiment) as active:
            record |= {"mlflow_tracking_uri": self.mlflow_uri, "mlflow_run_id": active.info.run_id}
            yield record


def log_evaluation(record: dict[str, Any], step: int, metrics: dict[str, float]) -> None:
    """Log evaluation figures into the training's run (`record` from `Tracking.run`), at its last step."""
    if record.get("tensorboard_dir"):
        # TensorBoard's own event writer (what torch's SummaryWriter wraps): the report runs without torch.
        import time

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        writer = EventFileWriter(record["tensorboard_dir"])
        values = [Summary.Value(tag=name, simple_value=value) for name, value in metrics.items()]
        writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        writer.close()
    if record.get("mlflow_run_id"):
        mlflow = _use_mlflow(record["mlflow_tracking_uri"])
        with mlflow.start_run(run_id=record["mlflow_run_id"]):
            mlflow.log_metrics({name.replace(",", "_"): value for name, value in metrics.items()}, step=step)
    if record.get("report_to"):
        log.info("logged %d evaluation figures to %s", len(metrics), ", ".join(record["report_to"]))
