"""What a job needs, estimated from the base model's shape and the settings: host memory, GPU memory
and time, so that a scheduler is asked for what the job will use. The rules call these when a job
is ready to run (its inputs exist: the base model's config, the tokenized data's stats); a dry run,
before those exist, gets the same estimate from the settings alone (every row at max_length).

Training memory, per process, is the sum of:
- the frozen base weights in their storage type (fp32 4 bytes, bf16/fp16 2, NF4 ~0.52 with its
  double-quantized constants; QLoRA keeps the embeddings in fp32),
- the LoRA factors with their gradients and AdamW's two moments (16 bytes per parameter),
- the activations kept for backward: per token and layer 7 hidden + 2 key/value + 2 MLP-wide values
  with the lean SwiGLU (4 more wide ones without it), or one hidden value per layer plus one layer's
  worth under gradient checkpointing; in the compute type,
- the loss: a 32 MB chunk (x3) with the fused loss, else the logits of the projected positions (x3),
- the runtime itself: ~0.6 GB for Python, torch and the libraries on CPU; the CUDA context on GPU.
Calibrated against the demo's measured peak RSS (`results/benchmarks/train_lora/demo.tsv`) on
tcmalloc; on CPU the host memory is then scaled by what the job's allocator adds (ALLOCATOR_OVERHEAD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .execution import Execution
from .io import read_json

GB = 1 << 30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# NF4: 4 bits a weight, an 8-bit absmax per 64 weights, and an fp32 constant per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CPU_RUNTIME_BYTES = 0.6 * GB
CUDA_CONTEXT_BYTES = 0.5 * GB
LOSS_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class ModelShape:
    """A Llama-like decoder's shape: enough to count its parameters and its activations."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of a decoder layer's linear layers: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def body_linear(self) -> int:
        return self.layers * sum(a * b for a, b in self.layer_linears)

    @property
    def embeddings(self) -> int:
        """The input embedding, and the output projection unless it is tied to it."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        return self.body_linear + self.embeddings + self.layers * 2 * self.hidden + self.hidden

    def lora(self, r: int) -> int:
        """LoRA factors of every linear layer of the decoder (all-linear)."""
        return self.layers * sum(r * (a + b) for a, b in self.layer_linears)


# Published shapes (their config.json), for estimates before a model is at hand.
KNOWN_SHAPES = {
    "SmolLM2-135M": ModelShape(576, 1536, 30, 9, 3, 49152, True),
    "Llama-3.2-1B": ModelShape(2048, 8192, 16, 32, 8, 128256, True),
    "Llama-2-7B": ModelShape(4096, 11008, 32, 32, 32, 32000, False),
    "Llama-3.1-8B": ModelShape(4096, 14336, 32, 32, 8, 128256, False),
    "Llama-2-13B": ModelShape(5120, 13824, 40, 40, 40, 32000, False),
    "LLaMA-65B": ModelShape(8192, 22016, 80, 64, 64, 32000, False),
    "Llama-2-70B": ModelShape(8192, 28672, 80, 64, 8, 32000, False),
}


def host_has_nvidia_gpu() -> bool:
    """Whether the NVIDIA driver sees a GPU on this host, known without importing torch or CUDA."""
    return Path("/proc/driver/nvidia/gpus").is_dir()


def model_shape(model_dir: str | Path) -> ModelShape | None:
    """The shape of a materialized model, or None before it exists."""
    config = Path(model_dir) / "config.json"
    return ModelShape.from_config(read_json(config)) if config.exists() else None


@dataclass(frozen=True)
class TrainingMemory:
    weights: float
    lora: float
    activations: float
    loss: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.loss + self.runtime


def training_memory(
    shape: ModelShape,
    *,
    device: str,
    precision: str,
    quantization: str,
    lora_r: int,
    tokens_per_step: int,
    gradient_checkpointing: bool,
    lean_swiglu: bool = True,
    fused_loss: bool = True,
) -> TrainingMemory:
    """Bytes one training process holds at its peak (see the module docstring)."""
    compute = BYTES[precision]
    if quantization == "qlora":
        weights = shape.body_linear * NF4_BYTES + shape.embeddings * 4
    else:
        weights = (shape.body_linear + shape.embeddings) * compute
    wide = 2 if lean_swiglu and not gradient_checkpointing else 4
    per_layer = 7 * shape.hidden + 2 * shape.kv_width + wide * shape.intermediate
    if gradient_checkpointing:
        activations = tokens_per_step * (shape.layers * shape.hidden + per_layer) * compute
    else:
        activations = tokens_per_step * shape.layers * per_layer * compute
    loss = 3 * LOSS_CHUNK_BYTES if fused_loss else 3 * tokens_per_step * shape.vocab * 4
    runtime = CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    return TrainingMemory(weights, shape.lora(lora_r) * 16, activations, loss, runtime)


def training_flops(shape: ModelShape, tokens: int, lora_r: int, gradient_checkpointing: bool) -> float:
    """FLOPs of LoRA training on `tokens` tokens: forward and input gradients of the frozen weights
    (4 per weight), all three for the LoRA factors (6), and one more forward under checkpointing."""
    per_token = 4 * (shape.body_linear + shape.vocab * shape.hidden) + 6 * shape.lora(lora_r)
    if gradient_checkpointing:
        per_token += 2 * shape.body_linear
    return per_token * tokens


# Sustained rates for the time a scheduler is asked for, on a host whose cores other jobs share: a
# CPU job's own rate falls with its share of them (the demo's training reached ~55 GFLOP/s on two
# cores beside the test suite; issue 29's, beside other jobs, ~5), a data-center GPU's does not.
SUSTAINED_FLOPS = {"cpu": 5e9, "cuda": 50e12}
# A CPU training process's peak host memory relative to the estimate (made on tcmalloc): glibc's
# malloc keeps the freed activations as holes (bench/results/train_throughput.json: 3,628 MB on
# glibc, 2,449 MB on tcmalloc, the run otherwise the same). jemalloc, not measured, is sized as glibc.
ALLOCATOR_OVERHEAD = {"tcmalloc": 1.0, "jemalloc": 1.5, "system": 1.5}
# What a job asks for beyond the estimate. On CPU the estimate is of the tensors alone, and the demo's
# training job (bench/results/demo_train_job.json) peaked 5% above it on tcmalloc: the interpreter,
# the libraries and the data loader; the margin also covers the estimate's own error.
HEADROOM = {"cpu": 1.4, "cuda": 1.2}


def step_tokens(settings: dict[str, Any], max_length: int, stats_path: str | Path | None, world_size: int) -> int:
    """Tokens of the largest step one process takes: its share of the batch, each row as long as the
    tokenized data's 95th percentile (or max_length before the data exists)."""
    rows = max(1, settings["batch_size"] // world_size)
    if stats_path is None or not Path(stats_path).exists():
        return rows * max_length
    stats = read_json(stats_path)
    histogram = sorted((int(start), count) for start, count in stats["train"]["length_histogram"].items())
    width, total, seen = stats["settings"]["histogram_bin_width"], sum(c for _, c in histogram), 0
    for start, count in histogram:
        seen += count
        if seen >= 0.95 * total:
            return rows * min(max_length, start + width)
    return rows * max_length


def train_resources(
    base_dir: str | Path,
    settings: dict[str, Any],
    max_length: int,
    stats_path: str | Path | None,
    gpus: int,
    processes: int,
    nodes: int,
    on_gpu: bool,
    allocator: str,
) -> dict[str, int]:
    """`mem_mb` (host memory of a node, all its processes), `gpu_mem_mb` (per GPU) and `runtime`
    (minutes) of a training job whose processes run on `allocator` (sftpipe.launch.planned_allocator)."""
    shape = model_shape(base_dir)
    if shape is None:  # planning before the base model exists
        return {"mem_mb": 16000, "runtime": 720}
    device = "cuda" if on_gpu else "cpu"
    precision = settings["precision"] if settings["precision"] != "auto" else ("bf16" if on_gpu else "fp32")
    per_node = gpus if gpus > 1 else processes
    memory = training_memory(
        shape,
        device=device,
        precision=precision,
        quantization=settings["quantization"],
        lora_r=settings["lora_r"],
        tokens_per_step=step_tokens(settings, max_length, stats_path, per_node * nodes),
        gradient_checkpointing=settings["gradient_checkpointing"],
        lean_swiglu=settings["lean_swiglu"],
        fused_loss=settings["fused_loss"],
    )
    stats = read_json(stats_path) if stats_path and Path(stats_path).exists() else None
    tokens = stats["train"]["tokens"] * settings["epochs"] if stats else 100_000
    if settings["max_steps"] > 0 and stats and stats["train"]["rows"]:
        tokens = settings["max_steps"] * settings["batch_size"] * stats["train"]["tokens"] / stats["train"]["rows"]
    seconds = training_flops(shape, int(tokens), settings["lora_r"], settings["gradient_checkpointing"]) / SUSTAINED_FLOPS[device]
    if device == "cuda":  # the GPUs work in parallel; CPU processes share the node's cores
        seconds /= per_node * nodes
    # Host memory on GPU is the weights being loaded, which the allocator's holes do not multiply.
    if device == "cpu":
        host = memory.total * ALLOCATOR_OVERHEAD[allocator] * per_node
    else:
        host = (memory.weights + 2 * GB) * per_node
    return {
        "mem_mb": math.ceil(HEADROOM[device] * host / (1 << 20)),
        **({"gpu_mem_mb": math.ceil(1.2 * memory.total / (1 << 20))} if device == "cuda" else {}),
        "runtime": max(30, math.ceil(2 * seconds / 60) + 10),
    }


def rl_resources(
    base_dir: str | Path, train: dict[str, Any], rl: dict[str, Any], max_length: int, on_gpu: bool, allocator: str
) -> dict[str, int]:
    """`mem_mb` (and on GPU `gpu_mem_mb`) of an RL job on `allocator`, as `train_resources` estimates a
    training step on `prompts_per_step` x `num_generations` completions: in one process, each prompt
    (up to `max_length`) once and each completion with its prompt's last token (sftpipe.grpo's shared
    prompts); in several, every row's prompt and completion. Its time goes to generation, which the
    training estimate does not count: `runtime` is fixed."""
    completions = rl["prompts_per_step"] * rl["num_generations"]
    settings = {**train, "batch_size": completions, "fused_loss": True}
    execution = Execution(**{key: train[key] for key in ("processes", "gpus", "nodes") if key in train})
    if execution.world_size == 1:
        tokens = rl["prompts_per_step"] * max_length + completions * (rl["max_completion_length"] + 1)
        length = -(-tokens // completions)
    else:
        length = max_length + rl["max_completion_length"]
    estimate = train_resources(base_dir, settings, length, None, 1, 1, 1, on_gpu, allocator)
    return {**estimate, "runtime": 240}


def model_memory_mb(model_dir: str | Path, copies: int, default: int) -> int:
    """Host memory of a job holding `copies` fp32 copies of the model (evaluating: 1, merging: 2,
    converting: 3), or `default` before the model exists."""
    shape = model_shape(model_dir)
    if shape is None:
        return default
    return math.ceil(1.2 * (copies * 4 * shape.parameters + 1.5 * GB) / (1 << 20))
