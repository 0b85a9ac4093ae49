# Helpers that turn the validated config into paths and per-rule parameters. Each rule gets only
# the config section it needs, so an unrelated edit reruns nothing.
import json
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from sftpipe.experiments import expand_experiments
from sftpipe.io import PipelineError
from sftpipe.launch import EXECUTION_KEYS

try:
    EXPERIMENTS = expand_experiments(config)
except PipelineError as error:
    raise WorkflowError(str(error)) from None
for _experiment in EXPERIMENTS.values():
    try:
        validate(_experiment.train, "../config/experiment_train.schema.yaml")
    except WorkflowError as error:
        raise WorkflowError(f"config key 'experiments.{_experiment.name}.train': {error}") from None

BASE_MODELS = {e.model: e.base_model for e in EXPERIMENTS.values()}
DATASETS = sorted({d for e in EXPERIMENTS.values() for d in e.datasets})
PACKAGE = Path(workflow.basedir) / "sftpipe"
# Hydrated rows that do not depend on a tokenizer are shared by every base model.
TEMPLATE_RENDERER = "template"


def one_of(names):
    """A wildcard constraint matching exactly these names (dots in a name are literal)."""
    return "|".join(re.escape(name) for name in names)


def code(*modules):
    """The package modules a job runs, declared as inputs so that editing them reruns the job
    (tests/test_envs.py checks each rule lists every module its script imports)."""
    return [str(PACKAGE / m) for m in ("io.py", *modules)]


# What reading a dataset or an lm-eval task pulls in.
DATA_MODULES = ("data.py", "formats.py", "demo.py")
EVALUATE_MODULES = ("evaluate.py", "metrics.py", "model.py", *DATA_MODULES)
TRAIN_MODULES = ("train.py", "launch.py", "loss.py", "attention.py", "swiglu.py", "artifacts.py", "model.py")


def dataset_config(name, without=()):
    """`datasets.<name>` as JSON, less the keys a rule does not read, so editing them reruns nothing there."""
    return json.dumps({k: v for k, v in config["datasets"][name].items() if k not in without}, sort_keys=True)


def local_dataset_files(name):
    """The local files a dataset is read from: editing the data reruns its download and all after it."""
    from sftpipe.data import DatasetSpec, local_source_files

    spec = DatasetSpec.from_config(name, config["datasets"][name])
    return [str(p) for p in local_source_files(spec, config["data"]["mirror_dir"])]


def uses_chat_template(name):
    from sftpipe.data import DatasetSpec

    return DatasetSpec.from_config(name, config["datasets"][name]).template == "chat"


def experiment_of(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def base_model_dir(model):
    return f"results/models/base/{model}"


def experiment_base_model(wildcards):
    return base_model_dir(experiment_of(wildcards).model)


def local_model_files(wildcards):
    """A base model read from a local directory, file by file: replacing its tokenizer or weights
    rebuilds the base model and everything tokenized or trained with it."""
    from sftpipe.model import local_model_dir

    path = local_model_dir(BASE_MODELS[wildcards.model]["source"])
    if path is None:
        return []
    # Hidden entries (a download tool's .cache/) are not the model.
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts))


def train_settings(wildcards):
    """The experiment's `train` keys that decide what it learns: how the job executes is not among them."""
    return {k: v for k, v in experiment_of(wildcards).train.items() if k not in EXECUTION_KEYS}


def execution_setting(key):
    """A `train` key that says how the job executes: a resource, so changing it reruns nothing."""
    return lambda wildcards: experiment_of(wildcards).train[key]


def trust_remote_code(wildcards):
    return experiment_of(wildcards).base_model["trust_remote_code"]


def base_model_setting(key):
    """A rule parameter from the base model the job's {model} wildcard names."""
    return lambda wildcards: BASE_MODELS[wildcards.model][key]


def hydrated_rows(wildcards):
    """The experiment's datasets as hydrated rows; 'chat'-templated ones are rendered per base model."""
    experiment = experiment_of(wildcards)
    return [
        f"results/data/hydrated/{experiment.model if uses_chat_template(d) else TEMPLATE_RENDERER}/{d}.jsonl"
        for d in experiment.datasets
    ]


def eval_data_dir(task):
    return f"results/data/lm_eval/{task}"


# lm-eval tasks whose data the pipeline downloads (the others name local files in the config).
DOWNLOADED_TASKS = {t["name"]: t for t in config["eval"]["lm_eval"]["tasks"] if not t.get("data_files")}


# What evaluation jobs get: the `eval.lm_eval` section, each task reading local data (its own
# files or what was downloaded).
LM_EVAL_SETTINGS = {
    **config["eval"]["lm_eval"],
    "tasks": [
        {**task, "data_dir": eval_data_dir(task["name"])} if task["name"] in DOWNLOADED_TASKS else task
        for task in config["eval"]["lm_eval"]["tasks"]
    ],
}


def lm_eval_data_files(wildcards):
    """The local data of every configured lm-eval task, so Snakemake builds or checks it first."""
    return [
        path
        for task in LM_EVAL_SETTINGS["tasks"]
        for path in ([task["data_dir"]] if "data_dir" in task else task["data_files"].values())
    ]


def evaluated_model(wildcards):
    if wildcards.variant == "base":
        return experiment_base_model(wildcards)
    return rules.merge_adapter.output[0].format(experiment=wildcards.experiment)
