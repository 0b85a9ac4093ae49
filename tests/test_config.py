"""The config schema is the one source of every key, default and choice: the stages' settings classes,
the registries the stages look names up in and config/README.md agree with it; its errors name the key."""

import copy
import dataclasses

import pytest
import yaml
from conftest import REPO

from sftpipe.attention import ATTENTION
from sftpipe.config import config_errors, describe, load_schema
from sftpipe.execution import ALLOCATORS, STRATEGIES, Execution
from sftpipe.export import GGUF_TYPES, ExportSettings
from sftpipe.filters import FilterSettings
from sftpipe.formats import FORMATS, PRESETS, TEMPLATES
from sftpipe.merge import DTYPES
from sftpipe.precision import PRECISIONS
from sftpipe.preference_settings import LOSS_TYPES, PreferenceSettings
from sftpipe.splits import SplitSettings
from sftpipe.tokenization import OVERLONG, LengthSettings
from sftpipe.train import QUANTIZATIONS, TrainJob, TrainSettings

SCHEMA = load_schema()
PROPERTIES = SCHEMA["properties"]
WEIGHT = PROPERTIES["datasets"]["additionalProperties"]["properties"]["weight"]


def _defaults(section: dict) -> dict:
    return {key: node.get("default") for key, node in section["properties"].items()}


def _fields(*classes) -> dict:
    return {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    ("section", "classes"),
    [
        (PROPERTIES["train"], (TrainSettings, Execution)),
        (PROPERTIES["data"]["properties"]["filters"], (FilterSettings,)),
        (PROPERTIES["data"]["properties"]["split"], (SplitSettings,)),
    ],
    ids=["train", "data.filters", "data.split"],
)
def test_settings_classes_have_the_schema_keys_and_defaults(section, classes):
    fields = _fields(*classes)
    if TrainSettings in classes:  # where the run is tracked travels with the job
        fields["report_to"] = list(next(f.default for f in dataclasses.fields(TrainJob) if f.name == "report_to"))
    assert fields == _defaults(section)


def test_preference_settings_have_the_schema_keys_and_defaults():
    loss = {key: default for key, default in _defaults(PROPERTIES["preference"]).items() if key not in ("datasets", "train")}
    assert _fields(PreferenceSettings) == loss


def test_length_settings_defaults_are_the_schema_defaults():
    data = _defaults(PROPERTIES["data"])
    assert _fields(LengthSettings) == {key: data[key] for key in ("max_length", "min_tokens", "overlong")}


def test_export_settings_defaults_are_the_schema_defaults():
    export = _defaults(PROPERTIES["export"])
    assert _fields(ExportSettings) == {**export, "gguf": tuple(export["gguf"])}


def _enum(*path: str) -> list:
    node = SCHEMA
    for key in path:
        node = node["properties"][key] if key != "*" else node["additionalProperties"]
    node = node.get("items", node)  # a list's choices are its items'
    return node["enum"] if "enum" in node else next(b["enum"] for b in node["oneOf"] if "enum" in b)


@pytest.mark.parametrize(
    ("path", "registry"),
    [
        (("datasets", "*", "preset"), PRESETS),
        (("datasets", "*", "format"), FORMATS),
        (("datasets", "*", "template"), TEMPLATES),
        (("train", "precision"), PRECISIONS),
        (("train", "quantization"), QUANTIZATIONS),
        (("train", "attention"), ATTENTION),
        (("train", "allocator"), ALLOCATORS),
        (("train", "strategy"), STRATEGIES),
        (("data", "overlong"), OVERLONG),
        (("merge", "dtype"), DTYPES),
        (("export", "gguf"), GGUF_TYPES),
        (("export", "serve"), GGUF_TYPES),
        (("preference", "loss_type"), LOSS_TYPES),
    ],
    ids=lambda p: ".".join(p) if isinstance(p, tuple) else "",
)
def test_schema_choices_are_the_registries(path, registry):
    assert sorted(_enum(*path)) == sorted(registry)


def test_config_readme_is_generated_from_the_schema():
    assert (REPO / "config" / "README.md").read_text() == describe(SCHEMA)


def test_every_key_is_described():
    undescribed = [row for row in describe(SCHEMA).splitlines() if row.startswith("| `") and row.endswith("|  |")]
    # A key that only points at another section (`experiments.<name>.base_model`) is described there.
    assert [row for row in undescribed if " as `" not in row] == []


DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def _errors(edit) -> list[str]:
    config = copy.deepcopy(DEMO)
    edit(config)
    return config_errors(config, SCHEMA)


@pytest.mark.parametrize(
    ("edit", "errors"),
    [
        (lambda c: None, []),
        (lambda c: c["train"].update(lora_rank=4), ["config key 'train.lora_rank': unknown key (did you mean lora_r?)"]),
        (lambda c: c["train"].update(lora_r="big"), ["config key 'train.lora_r': 'big' is not an integer"]),
        (
            lambda c: c["datasets"]["demo"].update(template="alpacca"),
            [
                "config key 'datasets.demo.template': 'alpacca' is not one of alpaca, guanaco, qa, chatml, chat, raw "
                "(did you mean alpaca?)"
            ],
        ),
        (
            lambda c: c["datasets"]["demo"].update(template={"prompt": "{{ q }}"}),
            ["config key 'datasets.demo.template.completion': required, but not given"],
        ),
        (
            lambda c: c["datasets"]["demo"].update(weight=1.5),
            [f"config key 'datasets.demo.weight': 1.5 is not {WEIGHT['description']}"],
        ),
        (lambda c: c["train"].update(target_modules=3), ["config key 'train.target_modules': 3 is not a string or a list"]),
        (
            lambda c: c["datasets"].update({"bad name!": {"preset": "alpaca"}}),
            ["config key 'datasets.bad name!': not a valid name (it must match ^[A-Za-z0-9][A-Za-z0-9_-]*$)"],
        ),
        (lambda c: c["base_model"].pop("source"), ["config key 'base_model.source': required, but not given"]),
        (
            lambda c: c.pop("experiment"),
            ["config: give either 'experiment' (one run) or 'experiments' (a sweep), not both or neither"],
        ),
        (
            lambda c: c["eval"]["lm_eval"]["tasks"][0].update(nme="x"),
            ["config key 'eval.lm_eval.tasks[0].nme': unknown key (did you mean name?)"],
        ),
        (
            lambda c: c.update(preference={"beta": 0, "loss_type": "dpo", "train": {"learning_rate": "low"}}),
            [
                "config key 'preference.beta': 0 is less than or equal to the minimum of 0",
                "config key 'preference.loss_type': 'dpo' is not one of " + ", ".join(LOSS_TYPES) + " (did you mean ipo?)",
                "config key 'preference.train.learning_rate': 'low' is not a number",
            ],
        ),
        (
            lambda c: (
                c.pop("experiment"),
                c.update(experiments={"x": {"preference": {"betta": 0.5, "train": {"lora": 4}}}}),
            ),
            [
                "config key 'experiments.x.preference.betta': unknown key (did you mean beta?)",
                "config key 'experiments.x.preference.train.lora': unknown key (did you mean lora_r?)",
            ],
        ),
    ],
    ids=[
        "valid",
        "unknown key",
        "wrong type",
        "unknown template",
        "half a user template",
        "weight",
        "one of two types",
        "dataset name",
        "required key",
        "experiment or experiments",
        "list item",
        "preference keys",
        "an experiment's preference keys",
    ],
)
def test_config_errors_name_the_key_first_and_alone(edit, errors):
    assert _errors(edit) == errors


def _plan(tmp_path, config, *before, after=()):
    """A dry run of `config` (written as my.yaml in `tmp_path`), `before` and `after` --configfile."""
    from workflow import snakemake

    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    return snakemake(tmp_path, "-n", *before, "--configfile", "my.yaml", *after, check=False)


PLANNED = {
    "experiment": "mine",
    "base_model": {"name": "tiny", "source": "tiny-random"},
    "datasets": {"demo": {"preset": "sftpipe_demo", "limit": 40}},
    "eval": {"lm_eval": {"tasks": []}},
}


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (
            {"datasets": {"mine": {"preset": "alpaca", "path": "data/missing.jsonl"}}},
            "config key 'datasets.mine.path': data/missing.jsonl does not exist",
        ),
        (
            {"eval": {"lm_eval": {"tasks": [{"name": "arc_esay"}]}}},
            "config key 'eval.lm_eval.tasks': 'arc_esay' is not an lm-eval task defined by a YAML file (did you mean arc_easy",
        ),
    ],
    ids=["dataset path", "lm-eval task"],
)
def test_what_the_config_alone_can_tell_stops_the_plan_in_one_line(tmp_path, edit, error):
    result = _plan(tmp_path, {**PLANNED, **edit})
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(error), result.stderr
    assert not (tmp_path / "results").exists()


def test_a_target_after_configfile_is_named_as_one(tmp_path):
    target = tmp_path / "results" / "eval" / "mine" / "base" / "exact_match.json"
    target.parent.mkdir(parents=True)
    target.write_text('{"exact_match": 0.5, "rows": 2, "settings": {}}')
    result = _plan(tmp_path, PLANNED, after=["results/eval/mine/base/exact_match.json"])
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "results/eval/mine/base/exact_match.json was given as a config file; targets go before --configfile"
    )
    # Where it belongs, it is a target.
    assert _plan(tmp_path, PLANNED, "results/eval/mine/base/exact_match.json").returncode == 0
