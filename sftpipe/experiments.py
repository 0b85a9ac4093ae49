"""Sweeps: the `experiments:` config section, each experiment a choice of datasets, base model and
training settings over the shared top-level sections, and optionally preference tuning and online RL
after SFT.

Stages that depend only on a dataset or a base model (download, hydration, base model, the base
model's lm-eval scores) are keyed by that dataset or model, so experiments that share them share
their artifacts and Snakemake runs them once. The others are named after the experiment that owns
them, which the experiments that agree on what they depend on share: those with the same datasets
and base model share the mix, the tokenized splits and the base model's exact match, so that a sweep
over training keys prepares and scores its data once; those tuned on preferences whose SFT is the
same (datasets, base model, training settings) share its stages, and those that also tune on the
same preference data share that data and its reference log-probs, so that a sweep over `beta` or
`loss_type` computes them once. Experiments tuned with online RL share their SFT the same way, so
that a sweep over `rl` keys trains one SFT (and, after the same preference tuning, tunes on
preferences once).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .execution import EXECUTION_KEYS
from .formats import FORMATS, is_preference_dataset
from .io import PipelineError
from .preference_settings import PreferenceSettings
from .rl_settings import RLSettings

# Path segments that are not experiment names (results/eval/<experiment>/ shares a level with them).
RESERVED_NAMES = {"base_model"}


@dataclass(frozen=True)
class Experiment:
    name: str
    datasets: tuple[str, ...]  # what SFT trains on
    base_model: dict[str, Any]
    train: dict[str, Any]
    # Preference tuning after SFT, or None: its `datasets` (a tuple), the PreferenceSettings keys, and
    # `train`, the keys of `train` it overrides.
    preference: dict[str, Any] | None = None
    # Online RL after SFT (and after preference tuning, where the experiment has it), or None: its
    # `datasets` (a tuple), the RLSettings keys (rewards as a list of mappings), and `train`, the keys
    # of `train` it overrides.
    rl: dict[str, Any] | None = None
    # The experiments whose stages this one's are (itself unless it shares another's): the SFT data
    # and the base model's exact match; training, merge and its evaluation; the preference pairs and
    # their reference log-probs; preference tuning, its merge and its evaluation.
    data_owner: str = ""
    sft_owner: str = ""
    preference_data_owner: str = ""
    preference_owner: str = ""

    @property
    def model(self) -> str:
        return self.base_model["name"]

    @property
    def preference_train(self) -> dict[str, Any]:
        """The training settings of the preference stage: the experiment's, with the preference overrides."""
        return {**self.train, **self.preference["train"]}

    @property
    def rl_train(self) -> dict[str, Any]:
        """The training settings of the RL stage: the experiment's, with the RL overrides."""
        return {**self.train, **self.rl["train"]}

    @property
    def tuned_after_sft(self) -> bool:
        """Whether a stage after SFT tunes the SFT model further, so that its SFT may be another's."""
        return self.preference is not None or self.rl is not None

    def describe(self) -> dict[str, Any]:
        """What the report and summary record about how this experiment differs from the others: its
        data, base model and what its training learns from (not how the job ran)."""
        train = {key: value for key, value in self.train.items() if key not in EXECUTION_KEYS}
        described = {"datasets": list(self.datasets), "base_model": self.base_model, "train": train}
        if self.preference is not None:
            described["preference"] = {**self.preference, "datasets": list(self.preference["datasets"])}
        if self.rl is not None:
            described["rl"] = {**self.rl, "datasets": list(self.rl["datasets"])}
        return described


def expand_experiments(config: dict[str, Any]) -> dict[str, Experiment]:
    """Resolve every experiment against the top-level sections, which act as defaults.

    Without `experiments:`, the single experiment named by `experiment:` uses every dataset. SFT takes
    the datasets of SFT formats, preference tuning those of preference formats.
    """
    if ("experiment" in config) == ("experiments" in config):
        raise PipelineError("config: give either 'experiment' (one run) or 'experiments' (a sweep), not both or neither")
    overrides = config.get("experiments") or {config["experiment"]: {}}
    pairs = sorted(name for name, dataset in config["datasets"].items() if is_preference_dataset(dataset))
    experiments = {}
    models: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, override in overrides.items():
        key = f"experiments.{name}"
        if name in RESERVED_NAMES:
            raise PipelineError(f"config key '{key}': '{name}' is reserved; choose another experiment name")
        datasets = tuple(override.get("datasets") or sorted(set(config["datasets"]) - set(pairs)))
        unknown = sorted(set(datasets) - set(config["datasets"]))
        if unknown:
            raise PipelineError(
                f"config key '{key}.datasets': {', '.join(unknown)} not defined under 'datasets' "
                f"(defined: {', '.join(sorted(config['datasets']))})"
            )
        if set(datasets) & set(pairs):
            raise PipelineError(
                f"config key '{key}.datasets': {', '.join(sorted(set(datasets) & set(pairs)))} hold preference pairs, "
                "which SFT cannot train on; name them under 'preference.datasets'"
            )
        if not datasets:
            raise PipelineError("config key 'datasets': every dataset holds preference pairs; SFT needs one that does not")
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
            preference=_preference(config, override, key, pairs),
            rl=_rl(config, override, key, datasets),
        )
    return _shared(experiments)


PREFERENCE_KEYS = tuple(f.name for f in fields(PreferenceSettings))


def _stage_section(config: dict[str, Any], override: dict[str, Any], key: str, stage: str) -> tuple[dict, str] | None:
    """A stage after SFT's section for one experiment: the top-level `stage` section with the
    experiment's own `stage` keys (and `stage.train` keys) over it, and the key it is reported under;
    None if neither is given."""
    top, own = config.get(stage), override.get(stage)
    if top is None and own is None:
        return None
    top, own = top or {}, own or {}
    merged = {**top, **own, "train": {**top.get("train", {}), **own.get("train", {})}}
    return merged, f"{key}.{stage}" if own else stage


def _preference(config: dict[str, Any], override: dict[str, Any], key: str, pairs: list[str]) -> dict[str, Any] | None:
    """An experiment's preference settings (see `_stage_section`); None if it has none."""
    if (section := _stage_section(config, override, key, "preference")) is None:
        return None
    merged, where = section
    datasets = tuple(merged.get("datasets") or pairs)
    if not datasets:
        kinds = ", ".join(name for name, fmt in FORMATS.items() if fmt.preference)
        raise PipelineError(f"config key '{where}': no dataset holds preference pairs (a format among {kinds}); add one")
    wrong = sorted(set(datasets) - set(pairs))
    if wrong:
        raise PipelineError(
            f"config key '{where}.datasets': {', '.join(wrong)} {'is not a dataset' if len(wrong) == 1 else 'are not datasets'} "
            f"of preference pairs (those defined: {', '.join(pairs) or 'none'})"
        )
    settings = PreferenceSettings(**{k: merged[k] for k in PREFERENCE_KEYS if k in merged})
    settings.check(where)
    return {"datasets": datasets, **asdict(settings), "train": merged["train"]}


RL_KEYS = tuple(f.name for f in fields(RLSettings))


def _rl(config: dict[str, Any], override: dict[str, Any], key: str, sft_datasets: tuple[str, ...]) -> dict[str, Any] | None:
    """An experiment's RL settings (see `_stage_section`); None if it has none. Its prompts come from
    the SFT datasets it names."""
    if (section := _stage_section(config, override, key, "rl")) is None:
        return None
    merged, where = section
    datasets = tuple(merged.get("datasets") or sft_datasets)
    wrong = sorted(set(datasets) - set(sft_datasets))
    if wrong:
        raise PipelineError(
            f"config key '{where}.datasets': {', '.join(wrong)} {'is not a dataset' if len(wrong) == 1 else 'are not datasets'} "
            f"this experiment's SFT trains on (those: {', '.join(sft_datasets)}); RL prompts are SFT training rows"
        )
    settings = RLSettings.from_config(merged)
    settings.check(where)
    as_config = {k: getattr(settings, k) for k in RL_KEYS if k != "rewards"}
    rewards = [{k: v for k, v in asdict(r).items() if v is not None} for r in settings.rewards]
    return {"datasets": datasets, **as_config, "rewards": rewards, "train": merged["train"]}


def _shared(experiments: dict[str, Experiment]) -> dict[str, Experiment]:
    """Each experiment with the experiments whose stages it shares named. Its data is the first one's
    (by name) with the same datasets and base model. The SFT of an experiment tuned on preferences is
    the first one's with the same datasets, base model and training settings, one without preference
    tuning if there is one; its preference data and reference log-probs are the first one's with that
    SFT, the same preference datasets, start and training precision; its preference tuning is the
    first one's with that SFT and the same preference section, so that a sweep over `rl` keys after
    preference tuning tunes on preferences once. RL shares SFT the same way. An experiment tuned
    neither on preferences nor with RL trains its own SFT."""

    def data_key(e: Experiment) -> str:
        return json.dumps([e.datasets, e.base_model], sort_keys=True)

    def sft_key(e: Experiment) -> str:
        learned = {k: v for k, v in e.train.items() if k not in EXECUTION_KEYS}
        return json.dumps([e.datasets, e.base_model, learned], sort_keys=True)

    by_name = sorted(experiments.values(), key=lambda e: e.name)
    ordered = sorted(by_name, key=lambda e: e.tuned_after_sft)
    resolved = {}
    for e in experiments.values():
        data = next(o.name for o in by_name if data_key(o) == data_key(e))
        sft = e.name if not e.tuned_after_sft else next(o.name for o in ordered if sft_key(o) == sft_key(e))
        resolved[e.name] = replace(e, data_owner=data, sft_owner=sft)
    tuned = [o for o in sorted(resolved.values(), key=lambda o: o.name) if o.preference is not None]
    for e in tuned:
        data = next(
            o.name
            for o in tuned
            if o.sft_owner == e.sft_owner
            and o.preference["datasets"] == e.preference["datasets"]
            # The reference is computed in the precision its preference run trains in.
            and o.preference_train.get("precision") == e.preference_train.get("precision")
            and o.preference["start"] == e.preference["start"]
        )
        owner = next(o.name for o in tuned if o.sft_owner == e.sft_owner and o.preference == e.preference)
        resolved[e.name] = replace(e, preference_data_owner=data, preference_owner=owner)
    return resolved
