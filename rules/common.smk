# Helpers that turn the validated config into paths and per-rule parameters. Each rule gets only
# the config section it needs, so an unrelated edit reruns nothing.
import functools
import re
from pathlib import Path

from sftpipe.entry import checked
from sftpipe.experiments import PREFERENCE_KEYS, expand_experiments
from sftpipe.export import ExportSettings
from sftpipe.execution import EXECUTION_KEYS
from sftpipe.resources import host_has_nvidia_gpu
from sftpipe.tasks import TaskSpec
from sftpipe.preference_settings import NOT_FOR_PAIRS

EXPERIMENTS = checked(workflow, lambda: expand_experiments(config))
EXPORT = checked(workflow, lambda: ExportSettings.from_config(config["export"]))

BASE_MODELS = {e.model: e.base_model for e in EXPERIMENTS.values()}
# Each experiment's datasets: SFT data, then preference pairs.
READS = {name: (*e.datasets, *(e.preference or {}).get("datasets", ())) for name, e in EXPERIMENTS.items()}
DATASETS = sorted({d for datasets in READS.values() for d in datasets})
PACKAGE = Path(workflow.basedir) / "sftpipe"


def one_of(names):
    """A wildcard constraint matching exactly these names (dots in a name are literal)."""
    return "|".join(re.escape(name) for name in names)


def code(*modules):
    """The package modules a job runs, declared as inputs so that editing them reruns the job
    (tests/test_envs.py checks each rule lists every module its script imports)."""
    return [str(PACKAGE / m) for m in ("io.py", *modules)]


# What reading a dataset or an lm-eval task pulls in.
DATA_MODULES = ("data.py", "formats.py", "demo.py")
TASK_MODULES = ("tasks.py", *DATA_MODULES)
EVALUATE_MODULES = ("evaluate.py", "metrics.py", "model.py", "tokenization.py", "splits.py", *TASK_MODULES)
TRAIN_MODULES = (
    "train.py",
    "launch.py",
    "execution.py",
    "loss.py",
    "attention.py",
    "swiglu.py",
    "artifacts.py",
    "model.py",
    "tracking.py",
)
REFERENCE_MODULES = ("reference.py", "model.py", "tokenization.py", "splits.py")


def dataset_config(name, without=()):
    """`datasets.<name>`, less the keys a rule does not read, so editing them reruns nothing there."""
    return {k: v for k, v in config["datasets"][name].items() if k not in without}


def local_dataset_files(name):
    """The local files a dataset is read from: editing the data reruns its download and all after it."""
    from sftpipe.data import local_source_files

    return [str(p) for p in local_source_files(dataset_spec(name), config["data"]["mirror_dir"])]


def dataset_spec(name, **kwargs):
    from sftpipe.data import DatasetSpec

    return DatasetSpec.from_config(name, config["datasets"][name], **kwargs)


def hub_mirror(name):
    """The mirror, for a dataset read from the Hub; None for the others, whose downloads it does not change."""
    return config["data"]["mirror_dir"] if dataset_spec(name, template_required=False).from_hub else None


def renderer(dataset, model):
    """The directory of a dataset's hydrated rows: the template that renders them (see DatasetSpec.renderer)."""
    return dataset_spec(dataset).renderer(model)


# Every renderer the experiments use: named templates, `chat-<model>`, `user-<hash>`. Reading each
# dataset's spec checks what the schema cannot (one source per dataset, a pin only on a file).
RENDERERS = checked(workflow, lambda: sorted({renderer(d, EXPERIMENTS[e].model) for e in READS for d in READS[e]}))


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
    return sorted(
        str(p) for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
    )


# A cluster job runs where its `gpu` resource puts it; a local one on this host's GPU, if it has one.
ON_GPU = not workflow.local_exec or host_has_nvidia_gpu()


@functools.cache
def _training_estimate(experiment, base, stats, ready):
    """sftpipe.resources' estimate for a training job (`ready`: its inputs exist, so the cache keeps a
    dry run's guess apart from the real figure)."""
    from sftpipe.resources import train_resources

    train = EXPERIMENTS[experiment].train
    max_length = config["data"]["max_length"]
    return train_resources(base, train, max_length, stats, train["gpus"], train["processes"], train["nodes"], ON_GPU)


def training_estimate(key):
    """A training job's resource, from the base model's shape, the settings and the tokenized data."""
    return lambda wildcards, input: _training_estimate(
        wildcards.experiment, input.base, input.stats, Path(input.stats).exists() and Path(input.base).exists()
    )[key]


@functools.cache
def _preference_estimate(experiment, base, stats, ready):
    """sftpipe.resources' estimate for a preference job, which holds a pair as one row of both its
    sequences (up to twice max_length) and scores it in TRL's chunks (no logits kept)."""
    from sftpipe.resources import train_resources

    train = {**EXPERIMENTS[experiment].preference_train, "fused_loss": True}
    return train_resources(base, train, 2 * config["data"]["max_length"], stats, 1, 1, 1, ON_GPU)


def preference_estimate(key):
    """A preference job's resource, from the SFT model's shape, the settings and the tokenized pairs."""
    return lambda wildcards, input: _preference_estimate(
        wildcards.experiment, input.base, input.stats, Path(input.stats).exists() and Path(input.base).exists()
    )[key]


def model_memory(copies, default):
    """The host memory of a job holding `copies` fp32 copies of its model (the input named `model`, else `base`)."""
    from sftpipe.resources import model_memory_mb

    return lambda wildcards, input: model_memory_mb(input.get("model", input.get("base")), copies, default)


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
    return [f"results/data/hydrated/{renderer(d, experiment.model)}/{d}.jsonl" for d in experiment.datasets]


def preference_hydrated_rows(wildcards):
    """The experiment's preference pairs as hydrated rows, rendered like its SFT data."""
    experiment = experiment_of(wildcards)
    return [f"results/data/hydrated/{renderer(d, experiment.model)}/{d}.jsonl" for d in experiment.preference["datasets"]]


def dataset_weights(names):
    """Each dataset's mixing weight (`datasets.<name>.weight`)."""
    return {name: config["datasets"][name].get("weight") for name in names}


def of_sft(path):
    """An output path of the SFT stages the job's experiment uses: its own, or those of the experiment
    it shares them with (Experiment.sft)."""
    return lambda wildcards: path.format(experiment=experiment_of(wildcards).sft)


def of_preference_data(path):
    """An output path of the preference data or reference stages the job's experiment uses
    (Experiment.preference_data)."""
    return lambda wildcards: path.format(experiment=experiment_of(wildcards).preference_data)


def preference_start(wildcards):
    """The model the preference adapter trains on and is merged into: the merged SFT model, or, when
    it keeps training the SFT adapter (preference.start: adapter), the base model under it."""
    if experiment_of(wildcards).preference["start"] == "adapter":
        return experiment_base_model(wildcards)
    return of_sft(rules.merge_adapter.output[0])(wildcards)


def preference_sft_adapter(wildcards):
    """The SFT adapter a preference run keeps training (preference.start: adapter), as an input."""
    if experiment_of(wildcards).preference["start"] != "adapter":
        return {}
    return {"sft_adapter": of_sft(rules.train_lora.output.adapter)(wildcards)}


def preference_settings(wildcards):
    """What the preference adapter learns: the loss settings and the training keys that apply to
    pairs; how the job runs is not among them."""
    experiment = experiment_of(wildcards)
    return {
        "preference": {key: experiment.preference[key] for key in PREFERENCE_KEYS},
        "train": {k: v for k, v in experiment.preference_train.items() if k not in (*EXECUTION_KEYS, *NOT_FOR_PAIRS)},
    }


def eval_data_dir(task):
    return f"results/data/lm_eval/{task}"


# The configured lm-eval tasks, by name; building each one's spec checks what the schema cannot.
EVAL_TASKS = {t["name"]: t for t in config["eval"]["lm_eval"]["tasks"]}
checked(workflow, lambda: [TaskSpec(**task) for task in EVAL_TASKS.values()])


# What evaluation jobs get: the `eval.lm_eval` section, each task reading the data `prepare_eval_data`
# wrote (where that data came from is that rule's business).
LM_EVAL_SETTINGS = {
    **config["eval"]["lm_eval"],
    "tasks": [
        {**{k: v for k, v in task.items() if k != "data_files"}, "data_dir": eval_data_dir(task["name"])}
        for task in EVAL_TASKS.values()
    ],
}


def lm_eval_data_files(wildcards):
    """The prepared data of every configured lm-eval task, so Snakemake builds or checks it first."""
    return [task["data_dir"] for task in LM_EVAL_SETTINGS["tasks"]]


def eval_task_source_files(wildcards):
    """The local files a task's data is prepared from, the user's `data_files` or its mirror files:
    editing one prepares the data again."""
    from sftpipe.data import source_files
    from sftpipe.tasks import mirror_files

    task = EVAL_TASKS[wildcards.task]
    if task.get("data_files"):
        return list(task["data_files"].values())
    if not config["data"]["mirror_dir"]:
        return []
    found = mirror_files(task["name"], task["num_fewshot"], config["data"]["mirror_dir"])
    return [str(f) for path in found for f in source_files(path)]


def of_variant(path, variant):
    """An evaluation output path for one variant: base, tuned or exported (those of the SFT the experiment uses),
    or preference (its own)."""
    return lambda wildcards: path.format(
        experiment=wildcards.experiment if variant == "preference" else experiment_of(wildcards).sft, variant=variant
    )


def evaluated_model(wildcards):
    if wildcards.variant == "base":
        return experiment_base_model(wildcards)
    if wildcards.variant == "preference":
        return rules.merge_preference_adapter.output[0].format(experiment=wildcards.experiment)
    if wildcards.variant == "exported":
        return rules.export_gguf.output[0].format(experiment=wildcards.experiment)
    return rules.merge_adapter.output[0].format(experiment=wildcards.experiment)


def evaluated_gguf_file(wildcards):
    """The exported GGUF file the exported variant reads (the one the Modelfile serves)."""
    return EXPORT.file(wildcards.experiment) if wildcards.variant == "exported" else None


def exported_exact_match(wildcards):
    """The exported model's exact match and predictions, for the report, where the config exports one."""
    if not EXPORT.gguf:
        return {}
    outputs = rules.evaluate_exact_match.output
    return {
        "exact_match_exported": of_variant(outputs.metrics, "exported")(wildcards),
        "predictions_exported": of_variant(outputs.predictions, "exported")(wildcards),
    }


def preference_report_inputs(wildcards):
    """The preference stage's results, for the report of an experiment tuned on preferences."""
    if experiment_of(wildcards).preference is None:
        return {}
    return {
        "lm_eval_preference": rules.evaluate_preference_lm_harness.output[0].format(**wildcards),
        "exact_match_preference": of_variant(rules.evaluate_exact_match.output.metrics, "preference")(wildcards),
        "predictions_preference": of_variant(rules.evaluate_exact_match.output.predictions, "preference")(wildcards),
        "preference_rewards": rules.evaluate_preference.output.metrics.format(**wildcards),
        "preference_history": rules.train_preference.output.history.format(**wildcards),
        "preference_stats": of_preference_data(rules.tokenize_preference_data.output.stats)(wildcards),
    }


def evaluated_test_rows(wildcards):
    """The held-out rows exact match scores: the test split of the SFT data, for every variant."""
    return rules.tokenize_and_split.output.test.format(experiment=experiment_of(wildcards).sft)
