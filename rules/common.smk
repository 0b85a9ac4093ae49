# Helpers that turn the validated config into paths and per-rule parameters. Each rule gets only
# the config section it needs, so an unrelated edit reruns nothing.
import json
from pathlib import Path

EXPERIMENT = config["experiment"]
BASE_MODEL = config["base_model"]["name"]
DATASETS = sorted(config["datasets"])
TRUST_REMOTE_CODE = config["base_model"]["trust_remote_code"]
PACKAGE = Path(workflow.basedir) / "sftpipe"


def code(*modules):
    """The package modules a job runs, declared as inputs so that editing them reruns the job."""
    return [str(PACKAGE / m) for m in ("io.py", *modules)]


def dataset_config(name):
    return json.dumps(config["datasets"][name], sort_keys=True)


def uses_chat_template(name):
    from sftpipe.data import DatasetSpec

    return DatasetSpec.from_config(name, config["datasets"][name]).template == "chat"


def lm_eval_data_files(wildcards):
    """Local data files named by the configured lm-eval tasks, so Snakemake builds or checks them first."""
    return [
        path
        for task in config["eval"]["lm_eval"]["tasks"]
        for path in (task.get("data_files") or {}).values()
    ]


def evaluated_model(wildcards):
    if wildcards.variant == "base":
        return rules.materialize_base_model.output[0].format(model=BASE_MODEL)
    return rules.merge_adapter.output[0].format(experiment=wildcards.experiment)
