"""RL's rewards: each `rl.rewards` entry as a function of a batch of completions and their rows, in
TRL's reward-function form. The built-ins are the pipeline's own exact-match metrics
(`sftpipe.metrics`), a whole-completion regular expression and math-verify's answer equivalence; the
user's own function is loaded from its file. Every reward is checked: one finite number per
completion, and an exception names the reward and the row it failed on."""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .io import PipelineError
from .metrics import normalized_match, numeric_match, strict_match, token_f1
from .rl_settings import RewardSpec

# The row fields a reward sees besides the completions: what the prompts stage writes per row.
ROW_FIELDS = ("id", "dataset", "source_id", "prompt", "reference")

Scorer = Callable[..., Sequence[Any]]  # (completions, references, **fields) -> one number per completion

METRICS = {
    "exact": strict_match,
    "normalized_exact": normalized_match,
    "token_f1": token_f1,
    "numeric": numeric_match,
}


def _per_row(metric: Callable[[str, str], float | bool], completions: list[str], references: list[str], **_) -> list[float]:
    return [float(metric(c, r)) for c, r in zip(completions, references, strict=True)]


def _format(pattern: re.Pattern, completions: list[str], references: list[str], **_) -> list[float]:
    return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]


def _math(completions: list[str], references: list[str], **_) -> list[float]:
    from math_verify import parse, verify

    return [float(verify(parse(r), parse(c))) for c, r in zip(completions, references, strict=True)]


def load_function(spec: str) -> Scorer:
    """The user's `path/file.py:name`, imported from its file (not from sys.path)."""
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(f"sftpipe_reward_{Path(path).stem}", path)
    if module_spec is None or not Path(path).is_file():
        raise PipelineError(f"reward {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise PipelineError(f"reward {spec}: importing {path} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise PipelineError(f"reward {spec}: {path} defines no function '{name}'")
    return function


def scorer(spec: RewardSpec) -> Scorer:
    if spec.kind in METRICS:
        return partial(_per_row, METRICS[spec.kind])
    if spec.kind == "format":
        return partial(_format, re.compile(spec.pattern))
    if spec.kind == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise PipelineError("reward math needs math-verify: pip install math-verify==0.9.0") from None
        return _math
    return load_function(spec.function)


def checked_rewards(name: str, score: Scorer, completions: list[str], rows: dict[str, list[Any]]) -> list[float]:
    """`score`'s rewards for the completions of `rows` (field -> one value per completion), checked:
    one finite number each. A reward that raises is run again row by row to name the row it fails on."""
    fields = {k: v for k, v in rows.items() if k != "reference"}
    try:
        rewards = list(score(completions, rows["reference"], **fields))
    except Exception as err:
        for i in range(len(completions)):
            try:
                score(completions[i : i + 1], rows["reference"][i : i + 1], **{k: v[i : i + 1] for k, v in fields.items()})
            except Exception as row_err:
                raise PipelineError(
                    f"reward {name} raised on row {rows['id'][i]} (completion {completions[i]!r}): "
                    f"{type(row_err).__name__}: {row_err}"
                ) from None
        raise PipelineError(f"reward {name} raised on a batch of rows {rows['id'][0]}...: {type(err).__name__}: {err}") from None
    if len(rewards) != len(completions):
        raise PipelineError(
            f"reward {name} returned {len(rewards)} values for {len(completions)} completions "
            f"(rows {', '.join(dict.fromkeys(rows['id']))}); it must return one per completion"
        )
    for i, reward in enumerate(rewards):
        if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
            raise PipelineError(f"reward {name} returned {reward!r} for row {rows['id'][i]}, not a finite number")
    return [float(reward) for reward in rewards]


def trl_reward_functions(specs: Sequence[RewardSpec]) -> list[Callable[..., list[float]]]:
    """One TRL reward function per reward, named as the reward (TRL logs `rewards/<name>/mean`): TRL
    calls it with the prompts, the completions and the dataset's columns, one value per completion."""
    functions = []
    for spec in specs:
        score = scorer(spec)

        def reward(prompts, completions, completion_ids=None, _score=score, _name=spec.name, **columns):
            rows = {field: columns[field] for field in ROW_FIELDS if field != "prompt"} | {"prompt": prompts}
            return checked_rewards(_name, _score, list(completions), rows)

        reward.__name__ = spec.name
        functions.append(reward)
    return functions
