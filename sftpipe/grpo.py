"""RL stage: online RL with verifiable rewards (GRPO) after SFT (or after preference tuning), on TRL's
GRPOTrainer. A fresh LoRA on the merged model (or its adapter, trained on) samples `num_generations` completions per
training-split prompt, the rewards (`sftpipe.rewards`) score them against the rows' reference answers,
and TRL's loss learns from the advantages within each group. LoraRecipe's model, schedule, precision,
checkpoints (a killed run resumes) and summary; prompts for data, GRPOTrainer for trainer.

Generation runs on a plain copy of the model whose adapted linear layers compute the policy's frozen
weight and its LoRA factors as three plain products, refreshed before each generation: the decoding
loop pays none of peft's per-layer dispatch and casts; and each prompt's KV cache is computed once
for its group of completions, not once per completion. The factors are not folded into the weight:
in bf16 a LoRA update is mostly below the weight's rounding step, so a folded copy samples from the
model RL started from, not from the policy. TRL's own generation (or vLLM) runs where that copy
cannot stand for the policy (DoRA, modules_to_save, a 4-bit base).

The loss's forward (and the reference's, where beta > 0) computes each group's prompt once too: the
prompt of every distinct row but its last token goes through the model once, with gradients, its keys
and values are gathered for the group's rows, and the rows' own tokens (the prompt's last, then the
completion) attend to them; only completion positions are projected onto the vocabulary. TRL
computes every row's prompt again and, off CUDA, projects every position.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.nn.functional import linear

from .artifacts import TrainSummary
from .io import PipelineError, read_jsonl
from .jobs import TrainSettings
from .rewards import ROW_FIELDS, trl_reward_functions
from .rl_settings import RLJob
from .tokenization import prompt_token_ids
from .train import LoraRecipe

log = logging.getLogger("sftpipe")


class FactoredLinear(torch.nn.Module):
    """A linear layer of the sampling copy: the policy's frozen weight (the same tensor, not a copy)
    plus its adapter's two factor products, in the order and precision peft computes them under the
    Trainer's autocast, so that the copy samples from the policy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        self.scaling = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = linear(x, self.weight, self.bias)
        return base + linear(linear(x, self.down), self.up) * self.scaling


class PolicySampler:
    """A copy of the policy's model without adapter modules, for sampling: before each generation its
    adapted linear layers take the policy's frozen weights and its adapter's current factors (cast to
    the weights' dtype, as autocast casts them in the policy's forward)."""

    def __init__(self, plain_model) -> None:
        # The modules are copied and the parameters shared: every weight of the copy is the policy's
        # frozen one, so no second model is allocated.
        self.model = copy.deepcopy(plain_model, memo={id(p): p for p in plain_model.parameters()}).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.seconds = 0.0  # spent generating, for the stage's generation share

    @staticmethod
    def usable(settings: TrainSettings) -> bool:
        """Whether the factored copy reproduces the policy: a plain LoRA on a full-precision base."""
        return not settings.use_dora and not settings.modules_to_save and settings.quantization == "none"

    @torch.no_grad()
    def refresh(self, policy) -> None:
        from peft.tuners.lora import LoraLayer

        layers = 0
        for name, module in policy.named_modules():
            if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
                adapter, base = module.active_adapters[0], module.base_layer
                path = name.removeprefix("base_model.model.")
                layer = self.model.get_submodule(path)
                if not isinstance(layer, FactoredLinear):
                    layer = FactoredLinear(base.weight, base.bias)
                    self.model.set_submodule(path, layer)
                layer.down = module.lora_A[adapter].weight.to(base.weight.dtype)
                layer.up = module.lora_B[adapter].weight.to(base.weight.dtype)
                layer.scaling = module.scaling[adapter]
                layers += 1
        if not layers:
            raise RuntimeError("the policy has no LoRA layer for the sampling copy to compute")

    def generate(self, policy, input_ids, attention_mask, **kwargs):
        start = time.perf_counter()
        self.refresh(policy)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=self.shared_prefill(input_ids, attention_mask),
            **kwargs,
        )
        self.seconds += time.perf_counter() - start
        return output

    @torch.no_grad()
    def shared_prefill(self, input_ids, attention_mask):
        """The KV cache of every prompt but its last token, computed once per group: GRPO samples each
        prompt `num_generations` times in consecutive rows, and the prompt is most of what a row's
        generation computes. None where the rows are not groups of one size."""
        from transformers import DynamicCache

        unique, counts = torch.unique_consecutive(input_ids, dim=0, return_counts=True)
        if len(unique) == len(input_ids) or len(set(counts.tolist())) != 1 or input_ids.shape[1] < 2:
            return None
        firsts = torch.cumsum(counts, 0) - counts
        mask = attention_mask[firsts, :-1]
        # Left padding: positions count real tokens only, as generate's own prefill counts them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=unique[:, :-1], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(int(counts[0]))
        return cache


def _rl_trainer():
    from trl import GRPOTrainer

    class PipelineGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that tokenizes prompts as SFT did (`prompt_token_ids`: one BOS, never two) and
        samples from a PolicySampler where one is set."""

        tokens_seen = 0  # real (non-pad) tokens of the generated batches trained on
        projected_positions = 0  # completion positions scored
        generator: PolicySampler | None = None
        share_prompts = True  # see shared_prompt_logps

        def _tokenize_prompts(self, prompts: list):
            return prompt_token_ids(self.processing_class, prompts), None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            if self.generator is None or self.use_vllm:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            policy = self.accelerator.unwrap_model(self.model)
            # TRL's own decoding path, its EOS masking included, with generate answered by the sampling copy.
            policy.generate = lambda **kwargs: self.generator.generate(policy, **kwargs)
            try:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            finally:
                del policy.generate

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
            shared = self.share_prompts and not args and _text_only(kwargs)
            if shared and (found := shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep, self.accelerator)):
                logps, entropies = found
                return logps, entropies if kwargs.get("compute_entropy") else None, None
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            self.tokens_seen += int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
            self.projected_positions += int(batch["completion_mask"].sum())
            return batch

    return PipelineGRPOTrainer


def _text_only(kwargs: dict) -> bool:
    """Whether TRL asks for the log-probs of text alone: no images, no MoE auxiliary loss."""
    return all(
        value is None for key, value in kwargs.items() if key not in ("batch_size", "compute_entropy", "compute_aux_loss")
    ) and (not kwargs.get("compute_aux_loss"))


def shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep: int, accelerator):
    """Each completion token's log-prob (and the entropy there) under `model`, as TRL's fused head
    computes them, with every distinct prompt computed once: the prompts but their last token run
    first, with gradients, into a KV cache gathered for the rows that share them; then each row's last
    prompt token and completion run on that cache. None where no prompt is shared, or the model is
    wrapped for several processes (whose wrapper expects one forward a step)."""
    from transformers import DynamicCache

    prompt_length = input_ids.size(1) - logits_to_keep
    if prompt_length < 2 or model is not accelerator.unwrap_model(model):
        return None
    prompts, inverse = torch.unique(input_ids[:, :prompt_length], dim=0, return_inverse=True)
    if len(prompts) == len(input_ids):
        return None
    rows = torch.arange(len(input_ids), device=input_ids.device)
    first = torch.empty(len(prompts), dtype=torch.long, device=input_ids.device).scatter_reduce_(
        0, inverse, rows, "amin", include_self=False
    )
    own = slice(prompt_length - 1, None)  # each row's last prompt token and its completion
    labels = input_ids[:, own].masked_fill(attention_mask[:, own] == 0, -100)
    cache = DynamicCache(config=model.config)
    with accelerator.autocast():
        model(
            input_ids=prompts[:, :-1],
            attention_mask=attention_mask[first, : prompt_length - 1],
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_select_indices(inverse)
        outputs = model(
            input_ids=input_ids[:, own], attention_mask=attention_mask, past_key_values=cache, labels=labels, fused_lm_head=True
        )
    return outputs.log_probs, outputs.entropy


class RLRecipe(LoraRecipe):
    """One process's RL run: LoraRecipe's model, adapter, schedule, checkpoints and summary; prompts
    for data, GRPOTrainer for trainer."""

    loss_is_nll = False

    def __init__(self, job: RLJob) -> None:
        self.rl = job.rl
        # TRL pads its generated batches, for the stock attention.
        super().__init__(replace(job, settings=replace(job.settings, padding_free=False)))
        if job.rl.use_vllm:
            check_vllm()

    def learned_settings(self) -> dict:
        return {**super().learned_settings(), **asdict(self.rl)}

    def fingerprinted_files(self) -> list[str | Path]:
        adapter = [Path(self.job.sft_adapter_dir) / "adapter_model.safetensors"] if self.job.sft_adapter_dir else []
        functions = [r.file for r in self.rl.rewards if r.file]
        return [Path(self.job.base_dir) / "config.json", self.job.train_path, *functions, *adapter]

    def setup_model(self) -> None:
        """The model of `base_dir`, and the plain copy generation samples from; with `start: adapter`,
        the SFT adapter on it, trainable, which the run keeps training."""
        super().setup_model()
        self.generator = PolicySampler(self.model) if PolicySampler.usable(self.settings) and not self.rl.use_vllm else None
        if self.job.sft_adapter_dir is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(self.job.sft_adapter_dir), is_trainable=True)

    def load_split(self, path: str | Path):
        from datasets import Dataset

        rows = [{field: row[field] for field in ROW_FIELDS} for row in read_jsonl(path)]
        return Dataset.from_list(rows) if rows else None

    def setup_data(self) -> None:
        self.train_set, self.eval_set = self.load_split(self.job.train_path), None
        if self.train_set is None:
            raise PipelineError(f"{self.job.train_path}: no RL prompts (no training rows of the datasets rl.datasets names)")

    def setup_trainer(self) -> None:
        from trl import GRPOConfig

        rl = self.rl
        completions = rl.prompts_per_step * rl.num_generations
        args = GRPOConfig(
            **{**self.trainer_arguments(), "per_device_train_batch_size": completions, "per_device_eval_batch_size": completions},
            num_generations=rl.num_generations,
            max_completion_length=rl.max_completion_length,
            temperature=rl.temperature,
            top_p=1.0,
            top_k=0,
            beta=rl.beta,
            epsilon=rl.epsilon,
            scale_rewards=rl.scale_rewards,
            loss_type=rl.loss_type,
            num_iterations=rl.num_iterations,
            reward_weights=[r.weight for r in rl.rewards],
            use_vllm=rl.use_vllm,
            vllm_mode="colocate",
            disable_dropout=True,
            remove_unused_columns=False,
            shuffle_dataset=True,
            log_completions=False,
        )
        self.trainer = _rl_trainer()(
            model=self.model,
            reward_funcs=trl_reward_functions(rl.rewards),
            args=args,
            train_dataset=self.train_set,
            processing_class=self.tokenizer,
            # A fresh LoRA, unless the model already carries the SFT adapter to keep training.
            peft_config=self.lora_config() if self.job.sft_adapter_dir is None else None,
            callbacks=self.callbacks(),
        )
        self.trainer.generator = self.generator
        self.factors_in_fp32()

    def train(self) -> TrainSummary:
        summary = super().train()
        generating = self.generator.seconds if self.generator else None
        log.info(
            "RL: %d steps, %s s generating of %.0f s",
            summary.steps,
            "n/a" if generating is None else f"{generating:.0f}",
            summary.train_runtime_s,
        )
        return summary


def check_vllm() -> None:
    """vLLM generation needs CUDA and the vllm package; elsewhere the config asks the impossible."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        raise PipelineError("config key 'rl.use_vllm': vLLM generation needs CUDA and vllm installed; set it to false here")


def train_rl(job: RLJob) -> TrainSummary:
    """Train the RL adapter in this process; write it (safetensors) to `job.adapter_dir` and the log
    history (TRL's rewards per reward function, KL, completion lengths, clip ratios) to `job.history_path`."""
    recipe = RLRecipe(job)
    recipe.setup()
    summary = recipe.train()
    recipe.save(summary)
    return summary
