"""Experiment tracking with local stores: the training curves and the evaluation figures land in one
TensorBoard log and one MLflow run, and a tracker that is not installed names the key."""

import json

import pytest
from conftest import job, tensorboard_scalars

from sftpipe.io import PipelineError
from sftpipe.tracking import Tracking, log_evaluation, parse_report_to
from sftpipe.train import TrainSettings, train_lora


def test_training_and_evaluation_share_one_tracked_run(tmp_path, tiny_model, tokenized, monkeypatch):
    from dataclasses import replace

    monkeypatch.chdir(tmp_path)  # the tracking stores live under results/tracking of the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = TrainSettings(max_steps=4, batch_size=8, eval_steps=4, logging_steps=1, precision="fp32")
    run = replace(job(tiny_model, tokenized, tmp_path, settings), name="tracked", report_to=("tensorboard", "mlflow"))
    summary = train_lora(run)
    tracking = summary.tracking
    assert tracking["report_to"] == ["tensorboard", "mlflow"]
    assert json.loads((tmp_path / "h.json").read_text())["summary"]["tracking"] == tracking
    assert len(tensorboard_scalars(tracking["tensorboard_dir"])["train/loss"]) == 4

    log_evaluation(tracking, summary.steps, {"eval/exact_match/normalized_exact_match/tuned": 0.75})
    assert tensorboard_scalars(tracking["tensorboard_dir"])["eval/exact_match/normalized_exact_match/tuned"] == [0.75]
    from sftpipe.tracking import _use_mlflow

    mlflow = _use_mlflow(tracking["mlflow_tracking_uri"])
    assert tracking["mlflow_tracking_uri"] == Tracking((), "x").mlflow_uri  # the local file store
    tracked = mlflow.get_run(tracking["mlflow_run_id"])
    assert tracked.info.run_name == "tracked" and tracked.info.status == "FINISHED"
    assert "loss" in tracked.data.metrics and tracked.data.metrics["eval/exact_match/normalized_exact_match/tuned"] == 0.75


def test_report_to_names_the_key_for_an_unknown_or_missing_tracker(monkeypatch):
    import sys

    assert parse_report_to("none") == () and parse_report_to("tensorboard,mlflow") == ("tensorboard", "mlflow")
    with pytest.raises(PipelineError, match="config key 'train.report_to': 'comet' is not one of"):
        parse_report_to("comet")
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(PipelineError, match="config key 'train.report_to': wandb is not installed"):
        parse_report_to("wandb")
