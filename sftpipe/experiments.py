"""Sweeps: the `experiments:` config section, each experiment a choice of datasets, base model and
training settings over the shared top-level sections.

Stages that depend only on a dataset or a base model (download, hydration, base model, the base
model's lm-eval scores) are keyed by that dataset or model, so experiments that share them share
their artifacts and Snakemake runs them once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .io import PipelineError

# Path segments that are not experiment names (results/eval/<experiment>/ shares a level with them).
RESERVED_NAMES = {"base_model"}


@dataclass(frozen=True)
class Experiment:
    name: str
    datasets: tuple[str, ...]
    base_model: dict[str, Any]
    train: dict[str, Any]

    @property
    def model(self) -> str:
        return self.base_model["name"]

    def describe(self) -> dict[str, Any]:
        """What the report and summary record about how this experiment differs from the others: its
        data, base model and what its training learns from (not how the job ran)."""
        from .launch import EXECUTION_KEYS

        train = {key: value for key, value in self.train.items() if key not in EXECUTION_KEYS}
        return {"datasets": list(self.datasets), "base_model": self.base_model, "train": train}


def expand_experiments(config: dict[str, Any]) -> dict[str, Experiment]:
    """Resolve every experiment against the top-level sections, which act as defaults.

    Without `experiments:`, the single experiment named by `experiment:` uses every dataset.
    """
    if ("experiment" in config) == ("experiments" in config):
        raise PipelineError("config: give either 'experiment' (one run) or 'experiments' (a sweep), not both or neither")
    overrides = config.get("experiments") or {config["experiment"]: {}}
    experiments = {}
    models: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, override in overrides.items():
        key = f"experiments.{name}"
        if name in RESERVED_NAMES:
            raise PipelineError(f"config key '{key}': '{name}' is reserved; choose another experiment name")
        datasets = tuple(override.get("datasets") or sorted(config["datasets"]))
        unknown = sorted(set(datasets) - set(config["datasets"]))
        if unknown:
            raise PipelineError(
                f"config key '{key}.datasets': {', '.join(unknown)} not defined under 'datasets' "
                f"(defined: {', '.join(sorted(config['datasets']))})"
            )
        base_model = override.get("base_model") or config["base_model"]
        seen = models.setdefault(base_model["name"], (name, base_model))
        if seen[1] != base_model:
            raise PipelineError(
                f"config key '{key}.base_model': the name '{base_model['name']}' is also used by experiment "
                f"'{seen[0]}' for a different model; give each base model its own name"
            )
        experiments[name] = Experiment(
            name=name,
            datasets=datasets,
            base_model=base_model,
            train={**config.get("train", {}), **override.get("train", {})},
        )
    return experiments
