"""The config, checked against `config/schema.yaml` before anything runs: each error names its key
first and alone (`config key 'train.lora_rank': unknown key (did you mean lora_r?)`), and an
experiment's training overrides are checked under their own key (`experiments.<name>.train.<key>`)."""

from __future__ import annotations

import difflib
import json
import os
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
            _suggestion(instance, error.validator_value)
            if isinstance(instance, str) and difflib.get_close_matches(instance, map(str, error.validator_value), n=1)
            else ""
        )
    elif kind in ("oneOf", "anyOf") and not path and "experiment" in str(error.validator_value):
        yield "config: give either 'experiment' (one run) or 'experiments' (a sweep), not both or neither"
    elif kind in ("oneOf", "anyOf") and error.context:
        yield from _alternatives(error, key, prefix)
    elif "propertyNames" in error.schema_path:
        yield f"config key '{_named(key, instance)}': not a valid name (it must match {error.validator_value})"
    else:
        yield f"config key '{key}': {error.message}"


def _alternatives(error, key: str, prefix: tuple) -> Iterator[str]:
    """A value that fits none of a key's alternatives: the one alternative for a value of its kind (a
    choice among names, a mapping of keys) says what is wrong; else the key's description does."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    branches, instance = error.validator_value, error.instance

    def fits(branch: dict) -> bool:
        kind = branch.get("type") or ("string" if all(isinstance(v, str) for v in branch.get("enum", [None])) else [])
        return Draft202012Validator({"type": kind}).is_valid(instance)

    fitting = [i for i, branch in enumerate(branches) if fits(branch)]
    if len(fitting) == 1 and ("enum" in branches[fitting[0]] or "properties" in branches[fitting[0]]):
        yield from _messages(best_match(e for e in error.context if e.relative_schema_path[0] == fitting[0]), prefix)
    elif not fitting:
        kinds = [
            t
            for branch in branches
            for t in ([branch["type"]] if isinstance(branch.get("type"), str) else branch.get("type", []))
        ]
        yield f"config key '{key}': {instance!r} is not {' or '.join(dict.fromkeys(TYPE_NAMES.get(t, t) for t in kinds))}"
    elif "description" in error.schema:
        yield f"config key '{key}': {instance!r} is not {error.schema['description']}"
    else:
        yield from _messages(best_match(error.context), prefix)


def config_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every problem of `config` against `schema`, one line each, in key order."""
    from jsonschema import Draft202012Validator

    messages = [m for e in Draft202012Validator(schema).iter_errors(config) for m in _messages(e)]
    # Overrides are keys of the top-level section they override: an experiment's `train:`,
    # `preference:` and `rl:` keys, and the `train:` keys of a `preference:` or `rl:` section.
    tuned = ("preference", "rl")
    sections = {name: Draft202012Validator(schema["properties"][name]) for name in ("train", *tuned)}
    overrides = [((stage, "train"), (config.get(stage) or {}).get("train"), "train") for stage in tuned]
    for name, override in (config.get("experiments") or {}).items():
        if isinstance(override, dict):
            overrides += [(("experiments", name, section), override.get(section), section) for section in sections]
            for stage in tuned:
                if isinstance(override.get(stage), dict):
                    overrides.append((("experiments", name, stage, "train"), override[stage].get("train"), "train"))
    for path, values, section in overrides:
        if isinstance(values, dict):
            messages += [m for e in sections[section].iter_errors(values) for m in _messages(e, path)]
    return sorted(messages)


def canonical(value: Any) -> Any:
    """`value` with the keys of every mapping in it sorted. Snakemake compares a job's params by their
    repr, so a config whose keys are sorted reruns nothing when its author reorders them."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


def check_config_files(paths: list[str | Path], schema_path: str | Path = SCHEMA) -> None:
    """Stop at a `--configfile` that is a target: Snakemake reads every argument after --configfile as
    a config file, so a results file named there would otherwise report its own keys as unknown
    config keys. A target lies under results/, or holds a mapping none of whose keys is a config key."""
    known = load_schema(schema_path)["properties"]
    for path in map(Path, paths):
        # As the user typed it, relative to the working directory, which holds results/.
        shown = Path(os.path.relpath(path)) if path.is_absolute() and path.is_relative_to(Path.cwd()) else path
        if shown.parts[:1] == ("results",):
            raise PipelineError(f"{shown} was given as a config file; targets go before --configfile")
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # Snakemake has read it already, and reports what it cannot
        if isinstance(content, dict) and content and not set(content) & set(known):
            raise PipelineError(f"{shown} was given as a config file; targets go before --configfile")


def check_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> None:
    """Raise a PipelineError listing every problem of `config`, one line each."""
    problems = config_errors(config, load_schema(schema_path))
    if problems:
        raise PipelineError("\n".join(problems))


def _type(node: dict[str, Any]) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" for v in node["enum"])
    if "enum" in node.get("items", {}):
        return "list of " + ", ".join(f"`{v}`" for v in node["items"]["enum"])
    for either in ("oneOf", "anyOf"):
        if either in node:
            return " or ".join(_type(branch) for branch in node[either])
    kinds = node.get("type", "object" if "properties" in node else "any")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    names = {
        "array": "list",
        "object": "mapping",
        "number": "number",
        "integer": "integer",
        "boolean": "boolean",
        "string": "string",
        "null": "null",
    }
    return " or ".join(names.get(k, k) for k in kinds)


def _rows(node: dict[str, Any], key: str, root: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    if "$ref" in node:
        yield key, "as `" + node["$ref"].removeprefix("#/properties/").replace("/properties/", ".") + "`", "", ""
        return
    children = node.get("properties")
    if key and (node.get("description") or not children):
        default = json.dumps(node["default"]) if "default" in node and node["default"] != {} else ""
        yield key, _type(node), default, " ".join(node.get("description", "").split())
    for name, child in (children or {}).items():
        yield from _rows(child, _named(key, name), root)
    entries = node.get("additionalProperties")
    if isinstance(entries, dict) and ("properties" in entries or "$ref" in entries):
        yield from _rows(entries, _named(key, "<name>"), root)
    items = node.get("items")
    if isinstance(items, dict) and "properties" in items:
        yield from _rows(items, f"{key}[]", root)


def describe(schema: dict[str, Any]) -> str:
    """`config/README.md`: every key of the schema, its type, default and description."""
    lines = [
        "# Configuration keys",
        "",
        "Every key `config/schema.yaml` accepts, generated from it (`python -m sftpipe.config > config/README.md`;",
        "tests/test_config.py checks this file is current). A config is checked against the schema before",
        "anything runs; a key left out takes its default. `<name>` stands for a name of yours.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{key}` | {kind} | {f'`{default}`' if default else ''} | {text.replace('|', chr(92) + '|')} |"
        for key, kind, default, text in _rows(schema, "", schema)
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(describe(load_schema()), end="")
