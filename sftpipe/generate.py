"""Generate from a merged model, or a base model plus adapter, with the template the model was trained on.

    python -m sftpipe.generate --model results/models/merged/demo --template chat "What is 12 plus 30?"
    python -m sftpipe.generate --model results/models/base/smollm2-135m-instruct \
        --adapter results/train/demo/adapter --template chat "Reverse: red lamp"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import chat_renderer
from .entry import silence_library_noise
from .evaluate import generate_greedy
from .formats import TEMPLATES, Example
from .io import PipelineError
from .model import load_model, load_tokenizer


def check_arguments(model_dir: str | Path, template: str, adapter_dir: str | Path | None = None) -> None:
    """What the command line names, checked before any weights load: a template, a model directory
    (a merged model or a base model) and an adapter directory."""
    if template not in TEMPLATES:
        raise PipelineError(f"--template: '{template}' is not one of {', '.join(sorted(TEMPLATES))}")
    for flag, path, marker in (("--model", model_dir, "config.json"), ("--adapter", adapter_dir, "adapter_config.json")):
        if path is None:
            continue
        if not Path(path).is_dir():
            raise PipelineError(f"{flag}: {path} is not a directory")
        if not (Path(path) / marker).is_file():
            raise PipelineError(f"{flag}: {path} has no {marker}")


def render_prompt(instruction: str, template: str, tokenizer, system: str | None = None) -> str:
    """The prompt exactly as hydration renders it for training, for a single user turn."""
    example = Example(instruction=instruction, output="", system=system)
    prompt, _ = TEMPLATES[template](example, "--prompt", chat_renderer(tokenizer))
    return prompt


def generate(
    model_dir: str | Path,
    instructions: list[str],
    template: str,
    adapter_dir: str | Path | None = None,
    max_new_tokens: int = 128,
    system: str | None = None,
) -> list[str]:
    """Greedy answers, each stopping at EOS."""
    check_arguments(model_dir, template, adapter_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    prompts = [render_prompt(i, template, tokenizer, system) for i in instructions]
    return generate_greedy(model.eval(), tokenizer, prompts, max_new_tokens, batch_size=16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftpipe.generate", description=__doc__.splitlines()[0])
    parser.add_argument("instructions", nargs="*", help="instructions; read one per line from stdin if none")
    parser.add_argument("--model", required=True, help="a merged model directory, or the base with --adapter")
    parser.add_argument("--adapter", help="a LoRA adapter directory to apply to --model")
    parser.add_argument("--template", default="chat", help=f"one of {', '.join(sorted(TEMPLATES))} (default: chat)")
    parser.add_argument("--system", help="system prompt, for the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    silence_library_noise()
    instructions = args.instructions or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        answers = generate(args.model, instructions, args.template, args.adapter, args.max_new_tokens, args.system)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for answer in answers:
        print(answer.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
