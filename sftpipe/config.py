"""The config, checked against `config/schema.yaml` before anything runs: each error names its key
first and alone (`config key 'train.lora_rank': unknown key (did you mean lora_r?)`), and an
experiment's training overrides are checked under their own key (`experiments.<name>.train.<key>`)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .io import PipelineError

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping of keys",
    "array": "a list",
    "null": "null",
}


def load_schema(path: str | Path = SCHEMA) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _key(path) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def _named(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _suggestion(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(map(str, choices)))})"


def _messages(error, prefix: tuple = ()) -> Iterator[str]:
    """One line per problem the jsonschema error stands for."""
    path = (*prefix, *error.absolute_path)
    key, kind, instance = _key(path), error.validator, error.instance
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        for name in instance:
            if name not in known:
                yield f"config key '{_named(key, name)}': unknown key{_suggestion(name, known)}"
    elif kind == "required":
        missing = re.match(r"'(.+)' is a required property", error.message)
        yield f"config key '{_named(key, missing[1] if missing else '?')}': required, but not given"
    elif kind == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        yield f"config key '{key}': {instance!r} is not {' or '.join(TYPE_NAMES.get(t, t) for t in expected)}"
    elif kind == "enum":
        yield f"config key '{key}': {instance!r} is not one of {', '.join(map(str, error.validator_value))}" + (
            _suggestion(instance, error.validator_value) if isinstance(instance, str) and
            difflib.get_close_matches(instance, map(str, error.validator_value), n=1) else ""
        )
    elif kind in ("oneOf", "anyOf") and not path and "experiment" in str(error.validator_value):
        yield "config: give either 'experiment' (one run) or 'experiments' (a sweep), not both or neither"
    elif kind in ("oneOf", "anyOf") and "description" in error.schema:
        yield f"config key '{key}': {instance!r} is not {error.schema['description']}"
    elif kind in ("oneOf", "anyOf") and error.context:
        # The alternative meant for a value of this type (a mapping, a string) says what is wrong with it.
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import best_match

        fitting = [
            e for e in error.context
            if Draft202012Validator({"type": error.validator_value[e.relative_schema_path[0]].get("type", [])}).is_valid(instance)
        ]
        if fitting or any(e.validator != "type" for e in error.context):
            yield from _messages(best_match(fitting or error.context), prefix)
        else:
            types = [TYPE_NAMES.get(t, t) for e in error.context for t in ([e.validator_value] if isinstance(e.validator_value, str) else e.validator_value)]
            yield f"config key '{key}': {instance!r} is not {' or '.join(dict.fromkeys(types))}"
    elif "propertyNames" in error.schema_path:
        yield f"config key '{_named(key, instance)}': not a valid name (it must match {error.validator_value})"
    else:
        yield f"config key '{key}': {error.message}"


def config_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every problem of `config` against `schema`, one line each, in key order."""
    from jsonschema import Draft202012Validator

    messages = [m for e in Draft202012Validator(schema).iter_errors(config) for m in _messages(e)]
    # An experiment's `train:` overrides are keys of the top-level `train` section.
    train = Draft202012Validator(schema["properties"]["train"])
    for name, override in (config.get("experiments") or {}).items():
        if isinstance(override, dict) and isinstance(override.get("train"), dict):
            messages += [m for e in train.iter_errors(override["train"]) for m in _messages(e, ("experiments", name, "train"))]
    return sorted(messages)


def check_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> None:
    """Raise a PipelineError listing every problem of `config`, one line each."""
    problems = config_errors(config, load_schema(schema_path))
    if problems:
        raise PipelineError("\n".join(problems))
