# Online RL with verifiable rewards after SFT, or after preference tuning where the experiment has it
# (GRPO), for experiments with an `rl:` section: the prompts are the SFT training split's rows of the
# datasets it names, a fresh LoRA on the merged model before it (or that model's adapter) learns from
# the rewards of its own samples, and it is merged and evaluated like the SFT adapter (variant rl).
# Every stage is the experiment's own; its SFT and preference tuning may be another experiment's
# (Experiment.sft_owner, .preference_owner), so a sweep over rl keys trains one SFT.


rule select_rl_prompts:
    input:
        # Training rows only: held-out rows never reach RL.
        train=of_data(rules.tokenize_and_split.output.train),
        code=CODE["select_rl_prompts"],
    output:
        prompts="results/rl/{experiment}/prompts.jsonl",
        stats="results/rl/{experiment}/prompts.json",
    log:
        "results/logs/select_rl_prompts/{experiment}.log",
    benchmark:
        "results/benchmarks/select_rl_prompts/{experiment}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        datasets=lambda wildcards: list(experiment_of(wildcards).rl["datasets"]),
    script:
        "../scripts/select_rl_prompts.py"


rule train_rl:
    input:
        unpack(rl_start_adapter),
        base=rl_start,
        prompts=rules.select_rl_prompts.output.prompts,
        # The user's reward functions' files: editing one reruns RL and what follows it.
        rewards=rl_reward_files,
        code=CODE["train_rl"],
    output:
        adapter=directory("results/rl/{experiment}/adapter"),
        history="results/rl/{experiment}/history.json",
    log:
        "results/logs/train_rl/{experiment}.log",
    benchmark:
        "results/benchmarks/train_rl/{experiment}.tsv"
    conda:
        "../envs/train.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=rl_estimate("mem_mb"),
        runtime=rl_estimate("runtime"),
        report_to=report_to,
        allocator=execution_setting("allocator"),
    params:
        settings=rl_settings,
        work_dir=lambda wildcards: f"results/rl/{wildcards.experiment}/work",
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/train_rl.py"


use rule merge_adapter as merge_rl_adapter with:
    input:
        base=rl_start,
        adapter=rules.train_rl.output.adapter,
        history=rules.train_rl.output.history,
        code=CODE["merge_adapter"],
    output:
        directory("results/models/rl/{experiment}"),
    log:
        "results/logs/merge_rl_adapter/{experiment}.log",
    benchmark:
        "results/benchmarks/merge_rl_adapter/{experiment}.tsv"


use rule evaluate_lm_harness as evaluate_rl_lm_harness with:
    input:
        model=rules.merge_rl_adapter.output[0],
        data_files=lm_eval_data_files,
        code=CODE["evaluate"],
    output:
        "results/eval/{experiment}/rl/lm_eval.json",
    log:
        "results/logs/evaluate_rl_lm_harness/{experiment}.log",
    benchmark:
        "results/benchmarks/evaluate_rl_lm_harness/{experiment}.tsv"
