"""GPU memory that LoRA and QLoRA training need, estimated for known model sizes or a model directory
(`sftpipe.resources`), beside nothing but the shapes: for a job's own estimate, `snakemake -n` prints
each job's resources once its base model and data exist.

    python -m sftpipe.plan [MODEL_DIR ...] [--tokens 512] [--lora-r 16]
"""

from __future__ import annotations

import argparse

from .resources import GB, KNOWN_SHAPES, ModelShape, model_shape, training_memory


def rows(shapes: dict[str, ModelShape], tokens: int, lora_r: int) -> list[list[str]]:
    table = []
    for name, shape in shapes.items():
        for quantization, precision in (("none", "bf16"), ("qlora", "bf16")):
            figures = [
                training_memory(
                    shape,
                    device="cuda",
                    precision=precision,
                    quantization=quantization,
                    lora_r=lora_r,
                    tokens_per_step=tokens,
                    gradient_checkpointing=checkpointing,
                ).total
                / GB
                for checkpointing in (True, False)
            ]
            method = "LoRA, bf16 base" if quantization == "none" else "QLoRA, NF4 base"
            table.append([name, f"{shape.parameters / 1e9:.2f}B", method, *(f"{f:.1f} GB" for f in figures)])
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sftpipe.plan", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model directories (default: the known sizes)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step and GPU (default: one row of 512)")
    parser.add_argument("--lora-r", type=int, default=16)
    args = parser.parse_args(argv)
    shapes = {str(m): model_shape(m) for m in args.models} if args.models else KNOWN_SHAPES
    missing = [name for name, shape in shapes.items() if shape is None]
    if missing:
        parser.error(f"no config.json in {', '.join(missing)}")
    header = ["model", "parameters", "method", "with checkpointing", "without"]
    print(f"GPU memory per process, {args.tokens} tokens a step, LoRA rank {args.lora_r} on every linear layer, AdamW")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows(shapes, args.tokens, args.lora_r):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
