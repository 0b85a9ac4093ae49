"""Sweeps: how `experiments:` resolves against the top-level sections, and its config errors."""

import pytest
import yaml

from sftpipe.experiments import expand_experiments
from sftpipe.io import PipelineError

BASE = {"name": "smol", "source": "packaged:smollm2-135m-instruct"}
DATASETS = {"alpaca": {"preset": "alpaca"}, "guanaco": {"preset": "guanaco"}}


def config(**extra):
    return {"base_model": BASE, "datasets": DATASETS, "train": {"lora_r": 16, "learning_rate": 2e-4}, **extra}


def test_a_single_experiment_uses_every_dataset_and_the_top_level_sections():
    [run] = expand_experiments(config(experiment="one")).values()
    assert run.name == "one" and run.datasets == ("alpaca", "guanaco")
    assert run.model == "smol" and run.train == {"lora_r": 16, "learning_rate": 2e-4}


def test_experiments_override_datasets_model_and_single_training_keys():
    tiny = {"name": "tiny", "source": "tiny-random"}
    runs = expand_experiments(
        config(experiments={"a": {}, "b": {"datasets": ["guanaco"], "base_model": tiny, "train": {"lora_r": 4}}})
    )
    assert runs["a"].datasets == ("alpaca", "guanaco") and runs["a"].model == "smol"
    assert runs["b"].datasets == ("guanaco",) and runs["b"].model == "tiny"
    # An override replaces its key only: the sweep keeps the top-level learning rate.
    assert runs["b"].train == {"lora_r": 4, "learning_rate": 2e-4}
    assert runs["a"].train["lora_r"] == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"experiment": "x", "experiments": {"y": {}}}, "either 'experiment'"),
        ({}, "either 'experiment'"),
        ({"experiments": {"a": {"datasets": ["alpaca", "dolphin"]}}}, r"'experiments.a.datasets': dolphin not defined"),
        ({"experiments": {"base_model": {}}}, "'experiments.base_model': 'base_model' is reserved"),
        (
            {"experiments": {"a": {}, "b": {"base_model": {"name": "smol", "source": "tiny-random"}}}},
            "'experiments.b.base_model': the name 'smol' is also used by experiment 'a'",
        ),
    ],
    ids=["both", "neither", "unknown dataset", "reserved name", "one name two models"],
)
def test_config_errors_name_the_key(extra, message):
    with pytest.raises(PipelineError, match=message):
        expand_experiments(config(**extra))


def test_a_stage_error_names_the_experiment_key_the_user_set(tmp_path, capsys):
    """A job sees an experiment's merged settings; its error names the key where the user set it."""
    from types import SimpleNamespace

    from sftpipe.entry import run_stage

    def failing():
        raise PipelineError("config key 'train.precision': fp16 needs CUDA")

    config_with_sweep = config(experiments={"gpu": {"train": {"precision": "fp16"}}, "plain": {}})
    for experiment, expected in (("gpu", "experiments.gpu.train.precision"), ("plain", "train.precision")):
        smk = SimpleNamespace(
            rule="train_lora",
            threads=1,
            log=[str(tmp_path / f"{experiment}.log")],
            config=config_with_sweep,
            wildcards=SimpleNamespace(experiment=experiment),
        )
        with pytest.raises(SystemExit) as stopped:
            run_stage(smk, failing)
        assert stopped.value.code == 1
        assert f"sftpipe error in rule train_lora: config key '{expected}': fp16 needs CUDA" in capsys.readouterr().err
        assert f"config key '{expected}'" in (tmp_path / f"{experiment}.log").read_text()


PAIRS = {**DATASETS, "pairs": {"format": "preference", "path": "pairs.jsonl"}, "hh": {"format": "hh_rlhf", "path": "hh.jsonl"}}


def preference_config(**extra):
    return config(**{"datasets": PAIRS, **extra})


def test_sft_takes_the_sft_datasets_and_preference_tuning_the_pairs():
    [run] = expand_experiments(
        preference_config(experiment="one", preference={"beta": 0.2, "train": {"learning_rate": 1e-5}})
    ).values()
    assert run.datasets == ("alpaca", "guanaco")
    assert run.preference["datasets"] == ("hh", "pairs") and run.preference["beta"] == 0.2
    assert run.preference["loss_type"] == "sigmoid"  # the default, where the config leaves it out
    # The preference stage trains with the experiment's settings, its own overrides on top.
    assert run.preference_train == {"lora_r": 16, "learning_rate": 1e-5}
    assert run.data_owner == run.sft_owner == run.preference_data_owner == "one"
    assert "preference" in run.describe()
    [plain] = expand_experiments(preference_config(experiment="plain")).values()
    assert plain.preference is None and "preference" not in plain.describe()


def test_a_sweep_shares_sft_and_reference_between_experiments_that_agree_on_them():
    runs = expand_experiments(
        preference_config(
            experiments={
                "sft-only": {},
                "b1": {"preference": {"datasets": ["pairs"], "beta": 0.1}},
                "b5": {"preference": {"datasets": ["pairs"], "beta": 0.5}},
                "hh": {"preference": {"datasets": ["hh"]}},
                "r4": {"train": {"lora_r": 4}, "preference": {"datasets": ["pairs"]}},
            },
        )
    )
    # The same SFT settings share the SFT of the experiment without preference tuning...
    assert {name: run.sft_owner for name, run in runs.items()} == {
        "sft-only": "sft-only",
        "b1": "sft-only",
        "b5": "sft-only",
        "hh": "sft-only",
        "r4": "r4",
    }
    # ...and the same SFT and pairs share one reference, whatever beta says.
    assert {name: run.preference_data_owner for name, run in runs.items()} == {
        "sft-only": "",
        "b1": "b1",
        "b5": "b1",
        "hh": "hh",
        "r4": "r4",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"experiment": "x", "preference": {}, "datasets": {"pairs": PAIRS["pairs"]}},
            "'datasets': every dataset holds preference pairs; SFT needs one that does not",
        ),
        ({"experiment": "x", "preference": {}, "datasets": DATASETS}, "'preference': no dataset holds preference pairs"),
        ({"experiments": {"x": {"datasets": ["alpaca", "pairs"]}}}, "'experiments.x.datasets': pairs hold preference pairs"),
        (
            {"experiment": "x", "preference": {"datasets": ["alpaca"]}},
            "'preference.datasets': alpaca is not a dataset of preference",
        ),
        (
            {"experiments": {"x": {"preference": {"loss_type": "exo_pair"}}}},
            "'experiments.x.preference.label_smoothing': loss_type exo_pair",
        ),
    ],
    ids=["only pairs", "no pairs", "pairs for SFT", "SFT data for preference", "exo_pair unsmoothed"],
)
def test_preference_config_errors_name_the_key(extra, message):
    with pytest.raises(PipelineError, match=message):
        expand_experiments(preference_config(**extra))


def test_experiments_with_the_same_data_share_its_stages_and_the_base_models_scores():
    runs = expand_experiments(
        config(experiments={"r4": {"train": {"lora_r": 4}}, "r8": {}, "guanaco": {"datasets": ["guanaco"]}})
    )
    assert {name: run.data_owner for name, run in runs.items()} == {"r4": "r4", "r8": "r4", "guanaco": "guanaco"}
    # Each trains its own adapter.
    assert {name: run.sft_owner for name, run in runs.items()} == {"r4": "r4", "r8": "r8", "guanaco": "guanaco"}


def test_a_lora_r_sweep_plans_the_data_stages_and_the_base_scores_once(tmp_path):
    from workflow import planned_jobs

    sweep = {
        "experiments": {"r4": {"train": {"lora_r": 4}}, "r8": {"train": {"lora_r": 8}}},
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {"demo": {"preset": "sftpipe_demo", "limit": 40}},
        "train": {"max_steps": 2},
        "eval": {"lm_eval": {"tasks": [{"name": "sftpipe_demo_mc", "data_files": {"test": "demo_mc.jsonl"}}]}},
    }
    (tmp_path / "demo_mc.jsonl").write_text("")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    jobs = planned_jobs(tmp_path, tmp_path / "sweep.yaml")
    assert jobs["filter_and_mix"] == jobs["tokenize_and_split"] == 1
    assert jobs["evaluate_base_lm_harness"] == 1 and jobs["evaluate_exact_match"] == 1 + 2  # base once, each tuned
    assert jobs["train_lora"] == jobs["evaluate_lm_harness"] == jobs["report"] == 2
