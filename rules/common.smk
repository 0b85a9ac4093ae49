# Helpers that turn the validated config into paths and per-rule parameters. Each rule gets only
# the config section it needs, so an unrelated edit reruns nothing. Functions that name another
# rule's output (rules.X) are called when the DAG is built, after every rule file is read.
import functools
import re
from pathlib import Path

from sftpipe.data import check_local_path
from sftpipe.entry import checked
from sftpipe.experiments import PREFERENCE_KEYS, RL_KEYS, expand_experiments
from sftpipe.export import ExportSettings
from sftpipe.execution import EXECUTION_KEYS, Execution, planned_allocator
from sftpipe.resources import host_has_nvidia_gpu
from sftpipe.tasks import TaskSpec, check_task_names
from sftpipe.preference_settings import NOT_FOR_PAIRS
from sftpipe.rl_settings import NOT_FOR_RL

# ---------------------------------------------------------------------------------------------
# Experiments, datasets and base models
# ---------------------------------------------------------------------------------------------

EXPERIMENTS = checked(workflow, lambda: expand_experiments(config))
EXPORT = checked(workflow, lambda: ExportSettings.from_config(config["export"]))

BASE_MODELS = {e.model: e.base_model for e in EXPERIMENTS.values()}
# Every dataset an experiment reads: its SFT data, then its preference pairs.
EXPERIMENT_DATASETS = {name: (*e.datasets, *(e.preference or {}).get("datasets", ())) for name, e in EXPERIMENTS.items()}
DATASETS = sorted({d for datasets in EXPERIMENT_DATASETS.values() for d in datasets})


def one_of(names):
    """A wildcard constraint matching exactly these names (dots in a name are literal)."""
    return "|".join(re.escape(name) for name in names)


def experiment_of(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def dataset_config(name, without=()):
    """`datasets.<name>`, less the keys a rule does not read, so editing them reruns nothing there."""
    return {k: v for k, v in config["datasets"][name].items() if k not in without}


def dataset_spec(name, **kwargs):
    from sftpipe.data import DatasetSpec

    return DatasetSpec.from_config(name, config["datasets"][name], **kwargs)


def renderer(dataset, model):
    """The directory of a dataset's hydrated rows: the template that renders them (see DatasetSpec.renderer)."""
    return dataset_spec(dataset).renderer(model)


# Every renderer the experiments use: named templates, `chat-<model>`, `user-<hash>`. Reading each
# dataset's spec checks what the schema cannot (one source per dataset, a pin only on a file), and a
# local `path:` that is not there is reported now, not when its download job runs.
RENDERERS = checked(
    workflow,
    lambda: sorted({renderer(d, EXPERIMENTS[e].model) for e, datasets in EXPERIMENT_DATASETS.items() for d in datasets}),
)
checked(workflow, lambda: [check_local_path(dataset_spec(d)) for d in DATASETS])

# ---------------------------------------------------------------------------------------------
# Code inputs: the package modules each stage runs, declared once per stage
# ---------------------------------------------------------------------------------------------

PACKAGE = Path(workflow.basedir) / "sftpipe"


def code(*modules):
    """The package modules a job runs, declared as inputs so that editing them reruns the job
    (tests/test_envs.py checks each rule lists every module its script imports)."""
    return [str(PACKAGE / m) for m in ("io.py", *modules)]


# What reading a dataset or an lm-eval task pulls in.
DATA_MODULES = ("data.py", "formats.py", "demo.py")
TASK_MODULES = ("tasks.py", *DATA_MODULES)
REFERENCE_MODULES = ("reference.py", "precision.py", "model.py", "tokenization.py", "splits.py")
EVALUATE_MODULES = ("evaluate.py", "metrics.py", "model.py", "tokenization.py", "splits.py", *TASK_MODULES)
TRAIN_MODULES = (
    "train.py",
    "precision.py",
    "fsdp.py",
    "launch.py",
    "worker.py",
    "jobs.py",
    "execution.py",
    "loss.py",
    "attention.py",
    "swiglu.py",
    "rmsnorm.py",
    "rotary.py",
    "lora_linear.py",
    "artifacts.py",
    "model.py",
    "tracking.py",
)

# A stage's rule and those derived from it (`use rule`, whose own input block replaces
# the whole of the original's) take their code from here.
CODE = {
    "materialize_base_model": code("model.py"),
    "read_dataset": code(*DATA_MODULES),
    "prepare_eval_data": code(*TASK_MODULES),
    "build_demo_choice_task": code("demo.py"),
    "filter_and_mix": code("filters.py", "dedup.py", "decontamination.py", "mixing.py", "splits.py", "words.py", *TASK_MODULES),
    "tokenize_and_split": code("tokenization.py", "splits.py", "model.py"),
    "train_lora": code(*TRAIN_MODULES),
    "train_preference": code("preference_train.py", "preference_settings.py", *REFERENCE_MODULES, *TRAIN_MODULES),
    "select_rl_prompts": code("rl_prompts.py"),
    "train_rl": code("grpo.py", "rewards.py", "rl_settings.py", "metrics.py", "tokenization.py", "splits.py", *TRAIN_MODULES),
    "merge_adapter": code("merge.py", "model.py", "artifacts.py"),
    "export_gguf": code("export.py", "model.py"),
    "evaluate": code(*EVALUATE_MODULES),
    "reference": code(*REFERENCE_MODULES),
    "report": code("report.py", "metrics.py", "artifacts.py", "significance.py", "tracking.py"),
}

# ---------------------------------------------------------------------------------------------
# Paths: local sources, base models, and the stages an experiment shares with another
# ---------------------------------------------------------------------------------------------


def local_dataset_files(name):
    """The local files a dataset is read from: editing the data reruns its download and all after it."""
    from sftpipe.data import local_source_files

    return [str(p) for p in local_source_files(dataset_spec(name), config["data"]["mirror_dir"])]


def hub_mirror(name):
    """The mirror, for a dataset read from the Hub; None for the others, whose downloads it does not change."""
    return config["data"]["mirror_dir"] if dataset_spec(name, template_required=False).from_hub else None


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


def hydrated_rows(datasets):
    """The hydrated rows of the experiment's SFT datasets (`datasets(experiment)`), or of its
    preference pairs; 'chat'-templated ones are rendered per base model."""
    return lambda wildcards: [
        f"results/data/hydrated/{renderer(d, experiment_of(wildcards).model)}/{d}.jsonl"
        for d in datasets(experiment_of(wildcards))
    ]


def of_owner(path, owner):
    """An output path of stages the job's experiment shares with the experiment `owner(experiment)`
    names (Experiment.data_owner, .sft_owner, .preference_data_owner): its own, or another's."""
    return lambda wildcards: path.format(experiment=owner(experiment_of(wildcards)))


def of_data(path):
    """The mix, the tokenized splits and the base model's exact match: shared by the experiments with
    the same datasets and base model."""
    return of_owner(path, lambda e: e.data_owner)


def of_sft(path):
    """Training, merge and the tuned model's evaluation: shared by experiments tuned on preferences
    after the same SFT."""
    return of_owner(path, lambda e: e.sft_owner)


def of_preference_data(path):
    """The preference pairs and their reference log-probs: shared by a sweep over the loss settings."""
    return of_owner(path, lambda e: e.preference_data_owner)


def of_preference(path):
    """Preference tuning, its merge and its evaluation: shared by a sweep over what follows them (rl keys)."""
    return of_owner(path, lambda e: e.preference_owner)


def of_variant(path, variant):
    """An evaluation output path for one variant: base (the experiment's data owner's), tuned or
    exported (its SFT owner's), preference (its preference owner's), or rl (its own)."""
    owners = {"base": lambda e: e.data_owner, "preference": lambda e: e.preference_owner, "rl": lambda e: e.name}
    return of_owner(path.replace("{variant}", variant), owners.get(variant, lambda e: e.sft_owner))


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


def rl_start(wildcards):
    """The model the RL adapter trains on and is merged into: the merged model before RL (SFT's, or
    preference tuning's where the experiment has it), or, when RL keeps training that model's adapter
    (rl.start: adapter), the model under that adapter."""
    experiment = experiment_of(wildcards)
    adapter = experiment.rl["start"] == "adapter"
    if experiment.preference is None:
        return experiment_base_model(wildcards) if adapter else of_sft(rules.merge_adapter.output[0])(wildcards)
    return preference_start(wildcards) if adapter else of_preference(rules.merge_preference_adapter.output[0])(wildcards)


def rl_start_adapter(wildcards):
    """The adapter an RL run keeps training (rl.start: adapter), as an input: SFT's, or preference
    tuning's where the experiment has it."""
    experiment = experiment_of(wildcards)
    if experiment.rl["start"] != "adapter":
        return {}
    if experiment.preference is None:
        return {"sft_adapter": of_sft(rules.train_lora.output.adapter)(wildcards)}
    return {"sft_adapter": of_preference(rules.train_preference.output.adapter)(wildcards)}


def rl_reward_files(wildcards):
    """The files of the user's reward functions (`path/file.py:name`)."""
    return [r["function"].rpartition(":")[0] for r in experiment_of(wildcards).rl["rewards"] if r["kind"] == "function"]


# ---------------------------------------------------------------------------------------------
# Rule parameters
# ---------------------------------------------------------------------------------------------


def train_settings(wildcards):
    """The experiment's `train` keys that decide what it learns: how the job executes is not among them."""
    return {k: v for k, v in experiment_of(wildcards).train.items() if k not in EXECUTION_KEYS}


def execution_setting(key):
    """A `train` key that says how the job executes: a resource, so changing it reruns nothing."""
    return lambda wildcards: experiment_of(wildcards).train[key]


def report_to(wildcards):
    """The trackers of the experiment's training runs (`train.report_to`, SFT's and RL's): a resource,
    so changing them reruns nothing."""
    return ",".join(experiment_of(wildcards).train["report_to"]) or "none"


def execution_of(experiment):
    return Execution(**{key: experiment.train[key] for key in Execution.__dataclass_fields__})


def gpu_request(key):
    """The training job's `gpu` or `gres` resource: how the SLURM plugin is to ask for its GPUs."""
    return lambda wildcards: execution_of(experiment_of(wildcards)).gpu_request()[key]


def check_execution_caps():
    """No training job asks for more than the profile's caps (--resources), which Snakemake would
    lower it to without a word."""
    caps = {name: workflow.global_resources.get(name).value for name in ("gpu", "nodes")}
    for name, experiment in EXPERIMENTS.items():
        execution_of(experiment).check_caps(caps, name)


checked(workflow, check_execution_caps)


def trust_remote_code(wildcards):
    return experiment_of(wildcards).base_model["trust_remote_code"]


def base_model_setting(key):
    """A rule parameter from the base model the job's {model} wildcard names."""
    return lambda wildcards: BASE_MODELS[wildcards.model][key]


def dataset_weights(names):
    """Each dataset's mixing weight (`datasets.<name>.weight`)."""
    return {name: config["datasets"][name].get("weight") for name in names}


def preference_settings(wildcards):
    """What the preference adapter learns: the loss settings and the training keys that apply to
    pairs; how the job runs is not among them."""
    experiment = experiment_of(wildcards)
    return {
        "preference": {key: experiment.preference[key] for key in PREFERENCE_KEYS},
        "train": {k: v for k, v in experiment.preference_train.items() if k not in (*EXECUTION_KEYS, *NOT_FOR_PAIRS)},
    }


def rl_settings(wildcards):
    """What the RL adapter learns: the RL settings and the training keys that apply to it; how the job
    runs is not among them."""
    experiment = experiment_of(wildcards)
    return {
        "rl": {key: experiment.rl[key] for key in RL_KEYS},
        "train": {k: v for k, v in experiment.rl_train.items() if k not in (*EXECUTION_KEYS, *NOT_FOR_RL)},
    }


# ---------------------------------------------------------------------------------------------
# Resource estimates (sftpipe.resources)
# ---------------------------------------------------------------------------------------------

# A cluster job runs where its `gpu` resource puts it; a local one on this host's GPU, if it has one.
ON_GPU = not workflow.local_exec or host_has_nvidia_gpu()


def job_allocator(choice):
    """The allocator a training job will run on, which its memory estimate follows: the one named, or
    for `auto` the one it finds on this host; on a cluster node, whose libraries this host cannot
    see, glibc's (the larger estimate)."""
    if choice != "auto":
        return choice
    return planned_allocator(choice)[0] if workflow.local_exec else "system"


@functools.cache
def _training_estimate(experiment, base, stats, ready):
    """sftpipe.resources' estimate for a training job (`ready`: its inputs exist, so the cache keeps a
    dry run's guess apart from the real figure)."""
    from sftpipe.resources import train_resources

    train = EXPERIMENTS[experiment].train
    max_length = config["data"]["max_length"]
    allocator = job_allocator(train["allocator"])
    return train_resources(base, train, max_length, stats, train["gpus"], train["processes"], train["nodes"], ON_GPU, allocator)


def training_estimate(key):
    """A training job's resource, from the base model's shape, the settings and the tokenized data."""
    return lambda wildcards, input: _training_estimate(
        wildcards.experiment, input.base, input.stats, Path(input.stats).exists() and Path(input.base).exists()
    )[key]


@functools.cache
def _preference_estimate(experiment, base, stats, ready):
    """sftpipe.resources' estimate for a preference job, which holds a pair as one row of both its
    sequences (up to twice max_length) and scores it in TRL's chunks (no logits kept); it trains in the
    job's own process, which nothing preloads another allocator into."""
    from sftpipe.resources import train_resources

    train = {**EXPERIMENTS[experiment].preference_train, "fused_loss": True}
    return train_resources(base, train, 2 * config["data"]["max_length"], stats, 1, 1, 1, ON_GPU, "system")


@functools.cache
def _rl_estimate(experiment, base, ready):
    """sftpipe.resources' estimate for an RL job (`ready`: its model exists)."""
    from sftpipe.resources import rl_resources

    experiment = EXPERIMENTS[experiment]
    allocator = job_allocator(experiment.train["allocator"])
    return rl_resources(base, experiment.rl_train, experiment.rl, config["data"]["max_length"], ON_GPU, allocator)


def rl_estimate(key):
    """An RL job's resource, from the model's shape and the section's settings."""
    return lambda wildcards, input: _rl_estimate(wildcards.experiment, input.base, Path(input.base).exists())[key]


def preference_estimate(key):
    """A preference job's resource, from the SFT model's shape, the settings and the tokenized pairs."""
    return lambda wildcards, input: _preference_estimate(
        wildcards.experiment, input.base, input.stats, Path(input.stats).exists() and Path(input.base).exists()
    )[key]


def model_memory(copies, default):
    """The host memory of a job holding `copies` fp32 copies of its model (the input named `model`, else `base`)."""
    from sftpipe.resources import model_memory_mb

    return lambda wildcards, input: model_memory_mb(input.get("model", input.get("base")), copies, default)


# ---------------------------------------------------------------------------------------------
# Evaluation: lm-eval tasks, the evaluated models and test rows
# ---------------------------------------------------------------------------------------------


def eval_data_dir(task):
    return f"results/data/lm_eval/{task}"


# The configured lm-eval tasks, by name; building each one's spec checks what the schema cannot,
# and a name no lm-eval YAML defines stops the workflow before any job runs.
EVAL_TASKS = {t["name"]: t for t in config["eval"]["lm_eval"]["tasks"]}
checked(workflow, lambda: [TaskSpec(**task) for task in EVAL_TASKS.values()])
checked(workflow, lambda: check_task_names(list(EVAL_TASKS)))


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


def evaluated_model(wildcards):
    if wildcards.variant == "base":
        return experiment_base_model(wildcards)
    if wildcards.variant == "preference":
        return rules.merge_preference_adapter.output[0].format(experiment=wildcards.experiment)
    if wildcards.variant == "rl":
        return rules.merge_rl_adapter.output[0].format(experiment=wildcards.experiment)
    if wildcards.variant == "exported":
        return rules.export_gguf.output[0].format(experiment=wildcards.experiment)
    return rules.merge_adapter.output[0].format(experiment=wildcards.experiment)


def evaluated_gguf_file(wildcards):
    """The exported GGUF file the exported variant reads (the one the Modelfile serves)."""
    return EXPORT.file(wildcards.experiment) if wildcards.variant == "exported" else None


def evaluated_test_rows(wildcards):
    """The held-out rows exact match scores: the test split of the SFT data, for every variant."""
    return of_data(rules.tokenize_and_split.output.test)(wildcards)


# ---------------------------------------------------------------------------------------------
# Report inputs
# ---------------------------------------------------------------------------------------------


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
        "lm_eval_preference": of_preference(rules.evaluate_preference_lm_harness.output[0])(wildcards),
        "exact_match_preference": of_variant(rules.evaluate_exact_match.output.metrics, "preference")(wildcards),
        "predictions_preference": of_variant(rules.evaluate_exact_match.output.predictions, "preference")(wildcards),
        "preference_rewards": of_preference(rules.evaluate_preference.output.metrics)(wildcards),
        "preference_history": of_preference(rules.train_preference.output.history)(wildcards),
        "preference_stats": of_preference_data(rules.tokenize_preference_data.output.stats)(wildcards),
    }


def rl_report_inputs(wildcards):
    """The RL stage's results, for the report of an experiment tuned with RL."""
    if experiment_of(wildcards).rl is None:
        return {}
    return {
        "lm_eval_rl": rules.evaluate_rl_lm_harness.output[0].format(**wildcards),
        "exact_match_rl": of_variant(rules.evaluate_exact_match.output.metrics, "rl")(wildcards),
        "predictions_rl": of_variant(rules.evaluate_exact_match.output.predictions, "rl")(wildcards),
        "rl_history": rules.train_rl.output.history.format(**wildcards),
        "rl_prompts": rules.select_rl_prompts.output.stats.format(**wildcards),
    }
