"""Online RL (GRPO) on the tiny model: prompts are training rows only, rewards score each completion
against its own row and name the row they fail on, the KL term exists exactly when beta > 0, the
sampling copy is the policy, the loss computes each group's prompt once and matches TRL's, a killed
run resumes, and the workflow reruns RL alone when
the user's reward file changes, shares one SFT over a sweep of rl keys, and tunes after preference
tuning where the experiment has it."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import killed_after_first_checkpoint, tensorboard_scalars
from workflow import planned_jobs, snakemake

from sftpipe.config import load_schema
from sftpipe.execution import Execution
from sftpipe.grpo import RLJob, RLRecipe, train_rl
from sftpipe.io import PipelineError, read_jsonl
from sftpipe.launch import launch
from sftpipe.rewards import trl_reward_functions
from sftpipe.rl_prompts import write_rl_prompts
from sftpipe.rl_settings import RewardSpec, RLSettings
from sftpipe.tokenization import prompt_token_ids
from sftpipe.train import TrainSettings

# Sampled from a random model, completions differ in how many distinct characters they hold: a reward
# that spreads within every group, so every step has advantages to learn from.
SPREAD_REWARD = "def spread(completions, references, **fields):\n    return [len(set(c)) / 10 for c in completions]\n"


def rl_job(model, prompts, out, rl, **settings):
    train = TrainSettings(**{"precision": "fp32", "max_steps": 3, "logging_steps": 1, "learning_rate": 1e-2, **settings})
    return RLJob(model, prompts, out / "adapter", out / "history.json", out / "work", train, rl)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tokenized):
    out = tmp_path_factory.mktemp("rl")
    write_rl_prompts(tokenized["train"], ["t"], out / "prompts.jsonl", out / "prompts.json")
    return out / "prompts.jsonl"


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "spread.py"
    path.write_text(SPREAD_REWARD)
    return RewardSpec("function", function=f"{path}:spread")


def small(**keys):
    return RLSettings(**{"num_generations": 4, "prompts_per_step": 2, "max_completion_length": 6, **keys})


def test_rl_settings_have_the_schema_keys_and_defaults():
    section = load_schema()["properties"]["rl"]["properties"]
    defaults = {key: node.get("default") for key, node in section.items() if key not in ("datasets", "train")}
    fields = {f.name: f.default for f in dataclasses.fields(RLSettings)}
    fields["rewards"] = [{"kind": r.kind} for r in fields["rewards"]]
    assert fields == defaults


def test_rl_prompts_are_the_training_rows_with_their_answers(tokenized, prompts):
    train = {r["id"]: r for r in read_jsonl(tokenized["train"])}
    held_out = {r["id"] for split in ("validation", "test") for r in read_jsonl(tokenized[split])}
    rows = list(read_jsonl(prompts))
    assert [r["id"] for r in rows] == list(train) and held_out and not held_out & {r["id"] for r in rows}
    assert all(r["prompt"] == train[r["id"]]["prompt"] and r["reference"] == train[r["id"]]["completion"] for r in rows)


def test_held_out_rows_never_reach_the_rl_prompts_in_the_workflow(tmp_path):
    config = {
        "experiment": "t",
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {"demo": {"preset": "sftpipe_demo", "limit": 60}},
        "data": {"split": {"validation_fraction": 0.1, "test_fraction": 0.2}},
        "train": {"precision": "fp32"},
        # Decontamination reads the task's documents, which the demo builds itself.
        "eval": {
            "lm_eval": {
                "tasks": [{"name": "sftpipe_demo_mc", "data_files": {"test": "results/data/lm_eval/sftpipe_demo_mc.jsonl"}}]
            }
        },
        "rl": {},
    }
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--cores", "1", "results/rl/t/prompts.jsonl", "--configfile", "rl.yaml")
    tokenized = tmp_path / "results/data/tokenized/t"
    ids = {split: {r["id"] for r in read_jsonl(tokenized / f"{split}.jsonl")} for split in ("train", "validation", "test")}
    prompted = {r["id"] for r in read_jsonl(tmp_path / "results/rl/t/prompts.jsonl")}
    assert prompted == ids["train"] and ids["test"] and not prompted & (ids["test"] | ids["validation"])


def rows_of(references):
    n = len(references)
    return {
        "id": [f"r{i}" for i in range(n)],
        "dataset": ["d"] * n,
        "source_id": [f"r{i}" for i in range(n)],
        "reference": references,
    }


def test_rewards_score_each_completion_against_its_own_row():
    references = ["12", "red blue", "The cat", "7", "3.5"]
    functions = trl_reward_functions([RewardSpec("exact"), RewardSpec("normalized_exact"), RewardSpec("token_f1")])
    # As TRL calls them: the prompts, the completions, and the dataset's columns, with TRL's own extras.
    called = [f(["p"] * 5, list(references), trainer_state=None, log_metric=print, **rows_of(references)) for f in functions]
    assert called == [[1.0] * 5] * 3
    numeric, math_reward = trl_reward_functions([RewardSpec("numeric"), RewardSpec("math")])
    assert numeric(["p"] * 3, ["It is 12.0", "1,200", "none"], **rows_of(["12", "1200", "4"])) == [1.0, 1.0, 0.0]
    assert math_reward(["p"] * 2, ["$\\frac{1}{2}$", "0.25"], **rows_of(["0.5", "1/2"])) == [1.0, 0.0]
    (formatted,) = trl_reward_functions([RewardSpec("format", pattern=r"\d+")])
    assert formatted(["p"] * 2, [" 42 ", "42 apples"], **rows_of(["x", "y"])) == [1.0, 0.0]


def test_a_user_reward_gets_the_rows_fields(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def score(completions, references, prompt, id, dataset, source_id):\n"
        "    return [float(c == r and i.startswith('r')) for c, r, i in zip(completions, references, id)]\n"
    )
    (score,) = trl_reward_functions([RewardSpec("function", function=f"{tmp_path}/mine.py:score")])
    assert score(["p", "q"], ["a", "x"], **rows_of(["a", "b"])) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "    return [1 / (c != 'boom') for c in completions]",
            r"reward .*bad\.py:score raised on row r1 \(completion 'boom'\): ZeroDivisionError",
        ),
        ("    return [1.0]", r"reward .*bad\.py:score returned 1 values for 3 completions \(rows r0, r1, r2\)"),
        ("    return [1.0, 'high', 0.0]", r"reward .*bad\.py:score returned 'high' for row r1, not a finite number"),
        ("    return [1.0, float('nan'), 0.0]", r"reward .*bad\.py:score returned nan for row r1"),
    ],
    ids=["raises", "wrong-length", "not-a-number", "nan"],
)
def test_a_failing_reward_is_named_with_its_row(tmp_path, body, message):
    (tmp_path / "bad.py").write_text(f"def score(completions, references, **fields):\n{body}\n")
    (score,) = trl_reward_functions([RewardSpec("function", function=f"{tmp_path}/bad.py:score")])
    with pytest.raises(PipelineError, match=message):
        score(["p"] * 3, ["fine", "boom", "ok"], **rows_of(["a", "b", "c"]))


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ({"kind": "format"}, "rl.rewards[0].pattern': a pattern is given with kind format"),
        ({"kind": "function", "function": "nowhere.py:f"}, "rl.rewards[0].function': nowhere.py does not exist"),
        ({"kind": "function", "function": "reward.py"}, "is not path/file.py:name"),
    ],
)
def test_reward_config_errors_name_the_key(reward, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        RLSettings.from_config({"rewards": [reward]}).check()


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["log_history"]


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_the_kl_term_is_there_exactly_when_beta_is_positive(tmp_path, tiny_model, prompts, spread, beta):
    summary = train_rl(rl_job(tiny_model, prompts, tmp_path, small(beta=beta, rewards=(spread,))))
    logged = [h for h in history(tmp_path) if "reward" in h]
    assert summary.steps == 3 and len(logged) == 3 and all(h["reward_std"] > 0 for h in logged)
    if beta == 0:
        # TRL computes no reference log-probs at beta 0, and so logs no KL.
        assert not any("kl" in h for h in logged)
    else:
        # The first step's policy is the reference; once it moved, the KL is there.
        assert logged[0]["kl"] == pytest.approx(0, abs=1e-6) and logged[-1]["kl"] > 1e-6


def test_the_rl_curves_reach_the_trackers(tmp_path, tiny_model, prompts, spread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tracking stores live under results/tracking of the working directory
    job = rl_job(tiny_model, prompts, tmp_path, small(beta=0.5, rewards=(spread,)))
    summary = train_rl(dataclasses.replace(job, name="t-rl", report_to=("tensorboard",)))
    assert summary.tracking["tensorboard_dir"] == str(tmp_path / "results/tracking/tensorboard/t-rl")
    curves = tensorboard_scalars(summary.tracking["tensorboard_dir"])
    reward = f"train/rewards/{spread.function}/mean"
    for name in (reward, "train/reward_std", "train/kl", "train/completions/mean_length", "train/frac_reward_zero_std"):
        assert len(curves[name]) == 3, name
    assert "train/clip_ratio/region_mean" in curves


@pytest.mark.parametrize(("allocator", "expected"), [("auto", "tcmalloc"), ("system", "system")])
def test_a_launched_rl_job_runs_as_given_on_the_allocator(tmp_path, tiny_model, prompts, spread, allocators, allocator, expected):
    summary = launch(rl_job(tiny_model, prompts, tmp_path, small(rewards=(spread,))), Execution(allocator=allocator))
    # Read from the training process's own memory map; its rewards are the job's, not the defaults.
    assert summary.allocator == expected and summary.steps == 3
    assert all(f"rewards/{spread.function}/mean" in h for h in history(tmp_path) if "reward" in h)


def test_the_rl_stage_runs_on_tcmalloc_and_tracks_its_curves(tmp_path, allocators):
    rl = {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 4, "train": {"max_steps": 2, "logging_steps": 1}}
    config = yaml.safe_load(rl_config(tmp_path, experiment="t", rl=rl).read_text())
    config["train"]["report_to"] = ["tensorboard"]
    # Decontamination reads the task's documents, which the demo builds itself; a test split to hold out.
    config["eval"]["lm_eval"]["tasks"][0]["data_files"]["test"] = "results/data/lm_eval/sftpipe_demo_mc.jsonl"
    config["data"] = {"split": {"validation_fraction": 0.1, "test_fraction": 0.2}}
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--cores", "1", "results/rl/t/history.json", "--configfile", "rl.yaml")
    summary = json.loads((tmp_path / "results/rl/t/history.json").read_text())["summary"]
    assert summary["allocator"] == "tcmalloc"  # train.allocator: auto
    assert summary["tracking"]["tensorboard_dir"] == str(tmp_path / "results/tracking/tensorboard/t-rl")
    assert len(tensorboard_scalars(summary["tracking"]["tensorboard_dir"])["train/rewards/exact/mean"]) == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_sampling_copy_is_the_policy(tmp_path, tiny_model, prompts, spread, precision):
    job = rl_job(tiny_model, prompts, tmp_path, small(rewards=(spread,)), max_steps=2, precision=precision)
    recipe = RLRecipe(job)
    recipe.setup()
    recipe.trainer.train()
    policy = recipe.trainer.model.eval()
    with torch.no_grad():
        if precision == "bf16":
            # An update mostly below the bf16 weights' rounding step, as RL's small steps are: folded
            # into the weights most of it would vanish, and the copy would sample from the start model.
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(1e-3)
            layer = policy.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
            weight, delta = layer.base_layer.weight, layer.get_delta_weight("default")
            folded = (weight.float() + delta).to(weight.dtype).float() - weight.float()
            assert (folded - delta).norm() > 0.9 * delta.norm() > 0
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
        recipe.generator.refresh(policy)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            trained = policy(input_ids=ids).logits
            with policy.disable_adapter():
                untrained = policy(input_ids=ids).logits
        sampled = recipe.generator.model(input_ids=ids).logits
    assert not torch.equal(trained, untrained)  # the adapter moved the policy
    assert torch.allclose(sampled.float(), trained.float(), atol=1e-5, rtol=0)


def test_each_group_prompt_is_prefilled_once(tmp_path, tiny_model, prompts, spread):
    recipe = RLRecipe(rl_job(tiny_model, prompts, tmp_path, small(rewards=(spread,)), max_steps=2))
    recipe.setup()
    recipe.trainer.train()
    policy = recipe.trainer.model.eval()
    # Groups of one prompt each, of different lengths (left-padded), their prompts prefilled once per group.
    rows = list(read_jsonl(prompts))
    ids = prompt_token_ids(recipe.tokenizer, [r["prompt"] for r in (rows[0], rows[-1]) for _ in range(3)])
    assert len({len(i) for i in ids}) == 2
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([[recipe.tokenizer.pad_token_id] * (width - len(i)) + i for i in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
    }
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": recipe.tokenizer.pad_token_id}
    greedy |= {"output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        assert recipe.generator.shared_prefill(**batch) is not None
        shared, own = recipe.generator.generate(policy, **batch, **greedy), policy.generate(**batch, **greedy)
    assert torch.equal(shared.sequences, own.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(shared.logits, own.logits, strict=True))


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_the_loss_computes_each_prompt_once_and_matches_trl(tmp_path, tiny_model, prompts, spread, precision, tolerance):
    from trl import GRPOTrainer

    recipe = RLRecipe(rl_job(tiny_model, prompts, tmp_path, small(rewards=(spread,)), precision=precision))
    recipe.setup()
    trainer, policy = recipe.trainer, recipe.trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that moves the model, so that both factors get gradients
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    # Two prompts of different lengths (left-padded), four completions each (right-padded), the rows
    # shuffled as TRL shuffles a generated batch.
    rows = list(read_jsonl(prompts))
    prompt_ids = prompt_token_ids(recipe.tokenizer, [rows[0]["prompt"], rows[-1]["prompt"]])
    assert len({len(i) for i in prompt_ids}) == 2
    width, pad = max(map(len, prompt_ids)), recipe.tokenizer.pad_token_id
    order = [0, 1, 1, 0, 1, 0, 0, 1]
    lengths = [5, 2, 5, 3, 4, 1, 5, 5]
    completions = torch.randint(3, 200, (8, 5))
    input_ids = torch.cat([torch.tensor([[pad] * (width - len(prompt_ids[g])) + prompt_ids[g] for g in order]), completions], 1)
    prompt_mask = torch.tensor([[0] * (width - len(prompt_ids[g])) + [1] * len(prompt_ids[g]) for g in order])
    completion_mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    mask = torch.cat([prompt_mask, completion_mask], 1)
    rows_seen = []
    hook = policy.get_input_embeddings().register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape))

    def logps_and_grads(function):
        policy.zero_grad()
        logps, entropies, _ = function(trainer, policy, input_ids, mask, 5, compute_entropy=True)
        (logps * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        return logps * completion_mask, entropies * completion_mask, grads

    ours = logps_and_grads(type(trainer)._get_per_token_logps_and_entropies)
    assert rows_seen == [(2, width - 1), (8, 6)]  # each distinct prompt once, then the rows' own tokens
    trl = logps_and_grads(GRPOTrainer._get_per_token_logps_and_entropies)
    hook.remove()
    assert rows_seen[2:] == [(8, width + 5)]
    for a, b in ((ours[0], trl[0]), (ours[1], trl[1]), *((ours[2][n], trl[2][n]) for n in trl[2])):
        assert torch.allclose(a, b, atol=tolerance * max(1.0, b.abs().max().item()), rtol=0)
    assert all(g.abs().sum() > 0 for g in trl[2].values())


def test_sigkill_then_rerun_resumes_from_the_last_checkpoint(tmp_path, tiny_model, prompts, spread):
    call = (
        "from pathlib import Path\n"
        "from sftpipe.grpo import RLJob, train_rl\n"
        "from sftpipe.rl_settings import RLSettings, RewardSpec\n"
        "from sftpipe.train import TrainSettings\n"
        f"train_rl(RLJob({str(tiny_model)!r}, {str(prompts)!r}, Path({str(tmp_path)!r}) / 'adapter', "
        f"Path({str(tmp_path)!r}) / 'history.json', Path({str(tmp_path)!r}) / 'work', "
        "TrainSettings(precision='fp32', max_steps=12, logging_steps=1, learning_rate=1e-2, save_steps=3), "
        "RLSettings(num_generations=4, prompts_per_step=2, max_completion_length=6, "
        f"rewards=(RewardSpec('function', function={spread.function!r}),))))\n"
    )
    saved = killed_after_first_checkpoint(call, tmp_path / "work")
    assert not (tmp_path / "adapter").exists()
    rl = small(rewards=(spread,))
    summary = train_rl(rl_job(tiny_model, prompts, tmp_path, rl, max_steps=12, save_steps=3))
    assert 3 <= summary.resumed_from_step == saved < 12
    assert summary.steps == 12 and summary.steps_run == 12 - saved
    assert sorted(h["step"] for h in history(tmp_path) if "reward" in h) == list(range(1, 13))
    assert not (tmp_path / "work").exists()


def rl_config(tmp_path, **rl):
    config = {
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {"demo": {"preset": "sftpipe_demo", "limit": 40}},
        "train": {"max_steps": 2, "precision": "fp32"},
        "eval": {"lm_eval": {"tasks": [{"name": "sftpipe_demo_mc", "data_files": {"test": "demo_mc.jsonl"}}]}},
        **rl,
    }
    (tmp_path / "demo_mc.jsonl").write_text("")
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "rl.yaml"


def test_editing_the_user_reward_reruns_rl_and_nothing_before_it(tmp_path):
    (tmp_path / "mine.py").write_text(SPREAD_REWARD)
    rl_config(tmp_path, experiment="t", rl={"rewards": [{"kind": "function", "function": "mine.py:spread"}]})
    # Every output marked up to date without running a job: what a finished run leaves.
    plan = snakemake(tmp_path, "-n", "--configfile", "rl.yaml").stdout
    for output in (o.strip() for line in re.findall(r"^    output: (.*)$", plan, re.M) for o in line.split(",")):
        path = tmp_path / output
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    snakemake(tmp_path, "--touch", "--cores", "1", "--configfile", "rl.yaml")
    assert planned_jobs(tmp_path, tmp_path / "rl.yaml") == {}
    (tmp_path / "mine.py").write_text(SPREAD_REWARD + "# tuned\n")
    jobs = planned_jobs(tmp_path, tmp_path / "rl.yaml")
    assert jobs == {
        "train_rl": 1,
        "merge_rl_adapter": 1,
        "evaluate_exact_match": 1,
        "evaluate_rl_lm_harness": 1,
        "report": 1,
        "summarize_experiments": 1,
        "all": 1,
    }


def test_a_sweep_over_rl_keys_trains_one_sft(tmp_path):
    config = rl_config(
        tmp_path,
        experiments={"b0": {"rl": {"beta": 0.0}}, "b1": {"rl": {"beta": 0.04}}, "default": {}},
        rl={"num_generations": 4},
    )
    jobs = planned_jobs(tmp_path, config)
    assert jobs["train_lora"] == jobs["merge_adapter"] == 1 and jobs["train_rl"] == jobs["merge_rl_adapter"] == 3
    # base once, the shared SFT once, each RL model once
    assert jobs["evaluate_exact_match"] == 1 + 1 + 3 and jobs["report"] == 3


def planned_inputs(workdir: Path, configfile: Path, rule: str) -> list[set[str]]:
    """Each planned job of `rule`: its input paths, from a dry run."""
    plan = snakemake(workdir, "-n", "--configfile", str(configfile)).stdout
    jobs = re.findall(rf"^rule {rule}:\n((?:    .*\n)+)", plan, re.M)
    return [set(re.search(r"^    input: (.*)$", job, re.M)[1].split(", ")) for job in jobs]


@pytest.mark.parametrize(
    "start, model, adapter",
    [
        ("merged", "results/models/preference/a", None),
        ("adapter", "results/models/merged/a", "results/preference/a/adapter"),
    ],
)
def test_rl_after_preference_tuning_starts_from_the_preference_model_tuned_once(tmp_path, start, model, adapter):
    config = yaml.safe_load(rl_config(tmp_path, rl={"start": start}).read_text())
    config["datasets"]["pairs"] = {"preset": "sftpipe_demo_pairs", "limit": 20}
    config["preference"] = {"beta": 0.2}
    config["experiments"] = {"a": {"rl": {"beta": 0.0}}, "b": {"rl": {"beta": 0.04}}}
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(tmp_path, tmp_path / "rl.yaml")
    # A sweep over rl keys after the same preference tuning trains SFT once and tunes on preferences once.
    assert jobs["train_lora"] == jobs["train_preference"] == jobs["merge_preference_adapter"] == 1
    assert jobs["train_rl"] == jobs["merge_rl_adapter"] == jobs["report"] == 2
    for inputs in planned_inputs(tmp_path, tmp_path / "rl.yaml", "train_rl"):
        assert model in inputs and (adapter in inputs if adapter else not any("adapter" in i for i in inputs))
        assert not any(i.startswith("results/train/") for i in inputs)  # not the SFT adapter, nor SFT's model


def test_rl_keeps_training_the_preference_adapter_through_the_workflow(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "mine.py").write_text(SPREAD_REWARD)
    rl = {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 4, "start": "adapter"}
    rl |= {"rewards": [{"kind": "function", "function": "mine.py:spread"}], "train": {"max_steps": 2}}
    config = yaml.safe_load(rl_config(tmp_path, experiment="t", rl=rl).read_text())
    config["datasets"]["pairs"] = {"preset": "sftpipe_demo_pairs", "limit": 20}
    config["preference"] = {"start": "adapter", "train": {"max_steps": 2}}
    config["eval"]["lm_eval"]["tasks"][0]["data_files"]["test"] = "results/data/lm_eval/sftpipe_demo_mc.jsonl"
    config["data"] = {"split": {"validation_fraction": 0.1, "test_fraction": 0.2}}
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--cores", "1", "results/models/rl/t", "--configfile", "rl.yaml")
    # SFT's adapter, trained on by preference tuning, then by RL: one adapter, three states.
    states = [
        load_file(tmp_path / f"results/{stage}/t/adapter/adapter_model.safetensors") for stage in ("train", "preference", "rl")
    ]
    assert states[0].keys() == states[1].keys() == states[2].keys()
    for before, after in zip(states, states[1:], strict=False):
        assert any(not torch.equal(before[key], after[key]) for key in before)
    assert (tmp_path / "results/models/rl/t/config.json").exists()


@pytest.mark.parametrize("after_preference", [False, True], ids=["after SFT", "after preference tuning"])
def test_the_report_sets_sft_and_rl_side_by_side(tmp_path, tiny_model, tokenized, prompts, spread, after_preference):
    from sftpipe.report import PreferenceInputs, ReportInputs, ReportOutputs, RLInputs, comparison_rows, write_report

    train_rl(rl_job(tiny_model, prompts, tmp_path, small(rewards=(RewardSpec("exact"), spread)), max_steps=2))
    rows = list(read_jsonl(tokenized["test"]))[:4]
    # rows answered right, of 4
    right = {"base": 0, "tuned": 2, "preference": 3, "rl": 4} if after_preference else {"base": 0, "tuned": 2, "rl": 4}
    paths = {}
    for variant, n in right.items():
        scored = [
            {"id": r["id"], "prompt": r["prompt"], "reference": r["completion"], "prediction": f"{variant} says"}
            | dict.fromkeys(("exact_match", "normalized_exact_match", "token_f1"), float(i < n))
            for i, r in enumerate(rows)
        ]
        rate = n / len(rows)
        metrics = dict.fromkeys(("exact_match", "normalized_exact_match", "token_f1"), rate)
        metrics |= {
            "rows": len(rows),
            "settings": {"max_new_tokens": 8},
            "per_dataset": {"t": {"rows": 4, "normalized_exact_match": rate}},
        }
        task = {"metrics": {"acc,none": rate, "acc_stderr,none": 0.01}, "n_samples": {"effective": 4}}
        task |= {"settings": {"num_fewshot": 0}, "data": {"test": "local"}, "per_document": {"doc_id": [0], "acc": [rate]}}
        for name, content in (("em.json", metrics), ("lm.json", {"tasks": {"mc": task}})):
            (tmp_path / f"{variant}.{name}").write_text(json.dumps(content))
        (tmp_path / f"{variant}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scored))
        paths[variant] = {kind: tmp_path / f"{variant}.{kind}" for kind in ("em.json", "lm.json", "jsonl")}
    counts = dict.fromkeys(("rows_in", "rows_after_filters", "rows_out"), 4)
    filters = {"datasets": {"t": {**counts, **dict.fromkeys(("exact_duplicate", "near_duplicate"), 0), "weight": None}}}
    filters["datasets"]["t"] |= {"eval_contamination": 0, "test_overlap": 0}
    (tmp_path / "filters.json").write_text(json.dumps(filters))
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "t", "source": {"kind": "path"}, "rows": 48, "sha256": "0" * 64}))
    held_out = {"pairs": 4, "likelihood_accuracy": 1.0, "reference_likelihood_accuracy": 0.5}
    held_out |= dict.fromkeys(("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"), 0.5)
    (tmp_path / "rewards.json").write_text(json.dumps(held_out))
    # The RL run's history stands for the preference run's: the report reads the same summary from both.
    stats = tokenized["train"].parent / "stats.json"
    preference = PreferenceInputs(tmp_path / "rewards.json", tmp_path / "history.json", stats) if after_preference else None
    inputs = ReportInputs(
        lm_eval={v: p["lm.json"] for v, p in paths.items()},
        exact_match={v: p["em.json"] for v, p in paths.items()},
        predictions={v: p["jsonl"] for v, p in paths.items()},
        history=tmp_path / "history.json",
        data_stats=tokenized["train"].parent / "stats.json",
        filters=tmp_path / "filters.json",
        manifests=[tmp_path / "manifest.json"],
        rl=RLInputs(history=tmp_path / "history.json", prompts=prompts.with_suffix(".json")),
        preference=preference,
    )
    outputs = ReportOutputs(**{name: tmp_path / "report" / f"{name}.out" for name in ReportOutputs.__dataclass_fields__})
    summary = write_report("rl", inputs, outputs, {"train": {}, "rl": {"beta": 0.0}})
    markdown = outputs.markdown.read_text()
    assert "## Online RL (GRPO)" in markdown and "| rewards/exact/mean |" in markdown and "| frac_reward_zero_std |" in markdown
    compared = {(r["task"], r["metric"], r.get("compared")) for r in summary["significance"]}
    # RL's deltas and paired tests are over the model it started from.
    before = "preference" if after_preference else "tuned"
    assert ("exact match", "exact_match", f"rl vs {before}") in compared and ("mc", "acc", f"rl vs {before}") in compared
    if after_preference:
        assert "| metric | base | tuned | delta | preference | delta vs tuned | rl | delta vs preference |" in markdown
        assert "| exact_match | 0.0000 | 0.5000 | +0.5000 | 0.7500 | +0.2500 | 1.0000 | +0.2500 |" in markdown
        assert "rl: after SFT, preference tuning and then online RL" in markdown
    else:
        assert "| exact_match | 0.0000 | 0.5000 | +0.5000 | 1.0000 | +0.5000 |" in markdown
        assert ("exact match", "exact_match", "rl vs preference") not in compared
    assert summary["rl"]["prompts"]["rows"] == len(list(read_jsonl(prompts)))
    assert comparison_rows([summary])[0]["exact_match"] == {v: n / 4 for v, n in right.items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="where CUDA is, vLLM may be too")
def test_vllm_generation_without_cuda_is_an_error_naming_the_key(tmp_path, tiny_model, prompts):
    with pytest.raises(PipelineError, match=re.escape("config key 'rl.use_vllm': vLLM generation needs CUDA and vllm")):
        RLRecipe(rl_job(tiny_model, prompts, tmp_path, small(use_vllm=True)))
    assert not (tmp_path / "adapter").exists()


def test_rl_keeps_training_the_sft_adapter_and_samples_from_it(tmp_path, tiny_model, prompts, spread):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from sftpipe.model import load_model

    # An SFT adapter that changes the model (random factors on both sides).
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(tiny_model), config).save_pretrained(tmp_path / "sft")
    job = dataclasses.replace(
        rl_job(tiny_model, prompts, tmp_path, small(start="adapter", rewards=(spread,)), max_steps=2),
        sft_adapter_dir=tmp_path / "sft",
    )
    recipe = RLRecipe(job)
    recipe.setup()
    policy = recipe.trainer.model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    recipe.generator.refresh(policy)
    with torch.no_grad():
        assert torch.allclose(recipe.generator.model(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    recipe.save(recipe.train())
    sft, tuned = load_file(tmp_path / "sft/adapter_model.safetensors"), load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert sft.keys() == tuned.keys() and all(sft[k].shape == tuned[k].shape for k in sft)  # the SFT adapter's rank 4
    assert any(not torch.equal(sft[k], tuned[k]) for k in sft)
