"""bench/RESULTS.md, written from the benchmarks' JSON under bench/results/: every figure on the page
comes from a file a benchmark wrote (or, for the GPU memory estimates, from sftpipe.plan), none is
typed by hand. tests/test_results_page.py checks the committed page is this script's output.

    .venv/bin/python bench/results_page.py [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _table(headers: list[str], rows: list[list[object]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


def _host(info: dict) -> str:
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    return f"{info['cores']}-core {info['cpu']} ({', '.join(info['cpu_flags']) or 'no relevant flags'}); {versions}"


def _load(data: dict) -> str:
    """The 1-minute load average around the run, where the benchmark recorded it."""
    load = data.get("load_average_1min")
    return f"; load average {load['before']:.1f} before, {load['after']:.1f} after (other work on the cores)" if load else ""


def training(data: dict) -> list[str]:
    """bench/train_throughput.py: LoRA training of every variant, the two baselines first."""
    peaks = data["gemm_peak_gflops"]
    shapes = "model_gemm_rate" in data  # the GEMM rate at the model's own shapes, where the run measured it
    rounds = "rounds" in data  # each variant trained several times, where the run did
    rows = [
        [
            name,
            v["setup"].get("undoes", "baseline"),
            f"{v['real_tokens_per_s']:.1f}",
            *([" / ".join(f"{s:.1f}" for s in v["seconds_each_round"])] if rounds else []),
            f"{data['speedup_real_tokens_per_s']['vs notebooks'][name]:.2f}x",
            f"{data['speedup_real_tokens_per_s']['vs trl-defaults'][name]:.2f}x",
            f"{v['computed_gflops']:.1f} ({v['fraction_of_gemm_peak']:.0%})",
            *([f"{v['model_gemm_gflops']:.0f} ({v['fraction_of_model_gemm_rate']:.0%})"] if shapes else []),
            f"{v['peak_rss_mb'] / 1024:.1f} GB",
            f"{v['heldout_completion_loss']:.4f}",
        ]
        for name, v in data["variants"].items()
    ]
    h = data["hyperparameters"]
    return [
        f"## LoRA training (`bench/train_throughput.py`), {'native-bf16' if data['native_bf16'] else 'fp32-only'} host",
        "",
        f"{data['date']}, {_host(data)}; native bf16: {data['native_bf16']}{_load(data)}. SmolLM2-135M-Instruct, "
        f"{data['rows']} Alpaca rows, {data['steps']} steps of {h['batch_size']}, LoRA r {h['lora_r']} / alpha "
        f"{h['lora_alpha']}, learning rate {h['learning_rate']}, held-out loss on {data['heldout_rows']} rows. "
        f"FLOPs: {data['flop_counting']}. 2048³ GEMM peaks: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s"
        + (f"; at the model's shapes: {data['model_gemm_rate']}." if shapes else ".")
        + (f" Timing: {data['timing']}." if rounds else "")
        + (f" Evaluation while training: {data['evaluation_while_training']}." if "evaluation_while_training" in data else ""),
        "",
        *_table(
            [
                "variant",
                "what it changes",
                "real tokens/s",
                *(["seconds, each round"] if rounds else []),
                "vs notebooks",
                "vs TRL as shipped",
                "GFLOP/s as computed (share of its precision's 2048³ GEMM peak)",
                *(["GEMM GFLOP/s at its step's shapes (share of it computed)"] if shapes else []),
                "peak RSS",
                "held-out loss",
            ],
            rows,
        ),
        *memory_profiles(data),
    ]


def memory_profiles(data: dict) -> list[str]:
    """What each of our variants holds at its largest batch, where the run profiled it."""
    profiled = {
        name: v["memory_profile"]
        for name, v in data["variants"].items()
        # A profile taken without the checkpointing its run trained with says nothing of that run.
        if v.get("memory_profile") and not v["setup"]["gradient_checkpointing"]
    }
    if not profiled:
        return []
    keys = [key for key in next(iter(profiled.values())) if key.endswith("_mb")]
    rows = [[name, *(f"{p[key]:.0f}" for key in keys), p["largest_batch_tokens"]] for name, p in profiled.items()]
    return [
        "",
        "Memory at the largest batch (MB; `memory_profile` in the JSON: what the peak RSS holds beyond the "
        "components is the allocator's and the step's transient buffers):",
        "",
        *_table(["variant", *(key.removesuffix("_mb").replace("_", " ") for key in keys), "tokens"], rows),
    ]


def data_throughput(data: dict) -> list[str]:
    """bench/data_throughput.py: hydrate + tokenize against the raw tokenizer and the notebooks' map."""
    raw, seeds = data["raw_batched_tokenizer_rows_per_s"], data["seeds_map_batch_size_1_rows_per_s"]
    ours = data["sftpipe_hydrate_and_tokenize_rows_per_s"]
    return [
        "## Hydrate and tokenize (`bench/data_throughput.py`)",
        "",
        f"{data['benchmark']}, max_length {data['max_length']}, medians of {data['repeats']} interleaved repeats:",
        "",
        *_table(
            ["pipeline", "rows/s"],
            [
                ["raw batched tokenizer call (no templating, masking, split, stats or writing)", f"{raw:,.0f}"],
                ["the reference notebooks' `datasets.map`, batch size 1", f"{seeds:,.0f}"],
                ["sftpipe hydrate + tokenize", f"{ours:,.0f}"],
            ],
        ),
        "",
        f"sftpipe runs at {data['sftpipe_fraction_of_raw_tokenizer']:.0%} of the raw call and "
        f"{data['sftpipe_speedup_over_seeds']:.1f}x the notebooks' map.",
    ]


def generation(data: dict) -> list[str]:
    """bench/generation_throughput.py: batched exact-match generation against one prompt at a time."""
    single, batched = data["seeds_one_by_one"], data["sftpipe_batched"]
    return [
        "## Exact-match generation (`bench/generation_throughput.py`)",
        "",
        f"{data['benchmark']}, {data['rows']} rows, {data['max_new_tokens']} new tokens, {data['threads']} threads "
        f"({data['machine']}):",
        "",
        *_table(
            ["decoding", "rows/s", "new tokens/s"],
            [
                ["one prompt at a time", f"{single['rows_per_s']:.2f}", f"{single['new_tokens_per_s']:.1f}"],
                [f"batched ({data['batch_size']})", f"{batched['rows_per_s']:.2f}", f"{batched['new_tokens_per_s']:.1f}"],
            ],
        ),
        "",
        f"{data['speedup_rows_per_s']:.1f}x; identical outputs: {data['same_outputs']} ({data['outputs_differing']} differing).",
    ]


def rl_steps(data: dict) -> list[str]:
    """bench/rl_throughput.py: GRPO steps of ours and TRL's as shipped, on one model and the same prompts."""
    setup, theirs = data["setup"], data["variants"]["trl-as-shipped"]
    load = data["load_average_1_5_15"]
    return [
        "## Online RL steps (`bench/rl_throughput.py`)",
        "",
        f"{setup['prompts_per_step']} prompts x {setup['num_generations']} completions a step, up to "
        f"{setup['max_completion_length']} new tokens, {setup['precision']}, LoRA r {setup['lora_r']}, "
        f"{setup['steps']} steps (the first left out), each variant in its own process; {_host(data['host'])}; "
        f"load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after:",
        "",
        *_table(
            ["variant", "allocator", "s/step", "completions/s", "generating", "vs TRL as shipped"],
            [
                [
                    name,
                    v["allocator"],
                    f"{v['seconds_per_step']:.2f}",
                    f"{v['completions_per_s']:.2f}",
                    f"{v['generation_share']:.0%}",
                    f"{theirs['seconds_per_step'] / v['seconds_per_step']:.2f}x",
                ]
                for name, v in data["variants"].items()
            ],
        ),
    ]


def scaling(data: dict) -> list[str]:
    """bench/data_scaling.py: every data stage's cost per 1k rows and peak RSS, and dedup's recall."""
    stages = ("download", "hydrate", "filter_and_mix", "tokenize_and_split")
    rows = []
    for result in data["results"]:
        cells = []
        for stage in stages:
            s = result["stages"][stage]
            worker = f" (+{s['worker_peak_rss_mb']:.0f} MB a worker)" if s.get("worker_peak_rss_mb") else ""
            cells.append(f"{s['seconds_per_1k_rows']:.3f} s, {s['peak_rss_mb']:.0f} MB{worker}")
        dedup = result["dedup"]
        quality = f"{dedup['recall']:.3f} ({dedup['false_positives']}), {dedup['contamination_recall']:.3f}"
        rows.append([f"{result['rows']:,}", *cells, quality])
    return [
        "## Data stages at scale (`bench/data_scaling.py`)",
        "",
        f"{_host(data['host'])}; {data['threads']} MinHash workers; {data['settings']}. Seconds per 1k rows and peak "
        "RSS of each stage's own process; planted exact and near duplicates and ARC-Easy questions measure recall "
        "(`bench/results/data_scaling.png`).",
        "",
        *_table(["rows", *stages, "dedup recall (false positives), contamination recall"], rows),
    ]


def gpu_memory() -> list[str]:
    """sftpipe.plan's estimates for the known model sizes: computed from the shapes, not measured."""
    from sftpipe.plan import rows
    from sftpipe.resources import KNOWN_SHAPES

    return [
        "## GPU memory estimates (`python -m sftpipe.plan`)",
        "",
        "What `sftpipe.resources` asks for a training job on a GPU, from the model's shape: 512 tokens a step, LoRA "
        "rank 16 on every linear layer, AdamW. Estimates, not measurements.",
        "",
        *_table(["model", "parameters", "method", "with checkpointing", "without"], rows(KNOWN_SHAPES, 512, 16)),
    ]


def fsdp_memory(data: dict) -> list[str]:
    """bench/fsdp_memory.py: what each of two processes holds under DDP and under FSDP."""
    keys = ("parameters", "gradients", "optimizer_state", "peak_rss_mb")
    rows = [
        [strategy, rank, *(f"{held[key]:.1f}" for key in keys)]
        for strategy, ranks in data["per_rank_mb"].items()
        for rank, held in enumerate(ranks)
    ]
    ratios = ", ".join(f"{key} {ratio:.2f}x" for key, ratio in data["fsdp_over_ddp"].items())
    return [
        "## Per-rank memory, DDP vs FSDP (`bench/fsdp_memory.py`)",
        "",
        f"{data['date']}, {_host(data)}. {data['benchmark']}, precision {data['precision']}: {data['what']}. "
        f"FSDP over DDP, rank 0: {ratios}.",
        "",
        *_table(["strategy", "rank", "parameters (MB)", "gradients (MB)", "optimizer state (MB)", "peak RSS (MB)"], rows),
    ]


def mutations(data: dict) -> list[str]:
    """bench/mutations.py: which tests failed when the code they guard was broken."""
    rows = [[m["name"], m["breaks"], "killed" if m["killed"] else "SURVIVED", f"{m['seconds']} s"] for m in data["mutations"]]
    return [
        "## Mutations (`bench/mutations.py`)",
        "",
        f"Run {data['date']}: {sum(m['killed'] for m in data['mutations'])} of {len(data['mutations'])} killed.",
        "",
        *_table(["mutation", "what it breaks", "result", "time"], rows),
    ]


def page(results: Path = RESULTS) -> str:
    def read(name: str) -> dict:
        return json.loads((results / name).read_text())

    sections = [
        # One training run per kind of host measured on (bf16 native or not).
        *(training(json.loads(path.read_text())) for path in sorted(results.glob("train_throughput*.json"))),
        data_throughput(read("data_throughput.json")),
        generation(read("generation_throughput.json")),
        rl_steps(read("rl_throughput.json")),
        scaling(read("data_scaling.json")),
        fsdp_memory(read("fsdp_memory.json")),
        gpu_memory(),
        mutations(read("mutations.json")),
    ]
    intro = [
        "# Measured results",
        "",
        "Written by `bench/results_page.py` from `bench/results/*.json`; rerun a benchmark, then the script. Figures "
        "from different hosts, or from runs on a loaded host, are not comparable.",
    ]
    return "\n".join(intro + [line for section in sections for line in ["", *section]]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    Path(args.out).write_text(page())


if __name__ == "__main__":
    main()
