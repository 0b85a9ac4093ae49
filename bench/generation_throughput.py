"""Exact-match generation on SmolLM2-135M: batched greedy (the pipeline) vs one prompt at a time
(the reference notebooks' loop), on the same held-out prompts, in one run. Writes JSON.

    .venv/bin/python bench/generation_throughput.py [--rows 64] [--out bench/results/generation_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import host_info, smollm2

from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
from sftpipe.evaluate import generate_greedy
from sftpipe.io import read_jsonl
from sftpipe.model import load_model, load_tokenizer


def one_by_one_loop(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One prompt per generate() call, as the reference notebooks do."""
    outputs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/generation_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = smollm2(Path(tmp))
        spec = DatasetSpec.from_config("demo", {"preset": "sftpipe_demo", "limit": args.rows})
        download_dataset(spec, Path(tmp) / "raw.jsonl", Path(tmp) / "manifest.json", None)
        hydrate_dataset(spec, Path(tmp) / "raw.jsonl", Path(tmp) / "hydrated.jsonl", model_dir)
        prompts = [r["prompt"] for r in read_jsonl(Path(tmp) / "hydrated.jsonl")]
        tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()

        def measure(fn):
            start = time.perf_counter()
            with torch.inference_mode():
                outputs = fn()
            seconds = time.perf_counter() - start
            new_tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
            return outputs, {"seconds": seconds, "rows_per_s": len(prompts) / seconds, "new_tokens_per_s": new_tokens / seconds}

        one_by_one, baseline = measure(lambda: one_by_one_loop(model, tokenizer, prompts, args.max_new_tokens))
        batched, ours = measure(lambda: generate_greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size))

    result = {
        "benchmark": "exact-match generation, SmolLM2-135M-Instruct, greedy",
        "rows": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "date": time.strftime("%Y-%m-%d"),
        **host_info(),
        "threads": torch.get_num_threads(),
        "notebooks_one_by_one": baseline,
        "sftpipe_batched": ours,
        "speedup_rows_per_s": ours["rows_per_s"] / baseline["rows_per_s"],
        "same_outputs": one_by_one == batched,
        "outputs_differing": sum(a != b for a, b in zip(one_by_one, batched, strict=True)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
