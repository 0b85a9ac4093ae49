# Preference tuning after SFT, for experiments with a `preference:` section: the pairs go through the
# SFT data stages, the merged SFT model's log-probs of them are computed once, and a fresh LoRA on that
# model learns from them; it is merged and evaluated like the SFT adapter. The data and reference
# stages are named after the experiment that owns them (Experiment.preference_data), which the
# experiments of a sweep over the loss settings share; the others after the experiment itself.


# The SFT mixing and splitting, on the pairs.
use rule filter_and_mix as filter_preference_data with:
    input:
        hydrated=preference_hydrated_rows,
        eval_data=lm_eval_data_files,
        # Pairs sharing words with the SFT test rows would inflate exact match after preference tuning.
        held_out=lambda wildcards: [of_sft(rules.filter_and_mix.output.rows)(wildcards)],
        code=code("filters.py", "dedup.py", "decontamination.py", "mixing.py", "splits.py", "words.py", *TASK_MODULES),
    output:
        rows="results/data/preference/{experiment}/mixed.jsonl",
        stats="results/data/preference/{experiment}/filters.json",
        removed="results/data/preference/{experiment}/removed.jsonl",
    log:
        "results/logs/filter_preference_data/{experiment}.log",
    benchmark:
        "results/benchmarks/filter_preference_data/{experiment}.tsv"
    params:
        weights=lambda wildcards: dataset_weights(experiment_of(wildcards).preference["datasets"]),


use rule tokenize_and_split as tokenize_preference_data with:
    input:
        rows=rules.filter_preference_data.output.rows,
        tokenizer=experiment_base_model,
        code=code("tokenization.py", "splits.py", "model.py"),
    output:
        train="results/data/preference/{experiment}/train.jsonl",
        validation="results/data/preference/{experiment}/validation.jsonl",
        test="results/data/preference/{experiment}/test.jsonl",
        stats="results/data/preference/{experiment}/stats.json",
    log:
        "results/logs/tokenize_preference_data/{experiment}.log",
    benchmark:
        "results/benchmarks/tokenize_preference_data/{experiment}.tsv"


rule precompute_reference_logps:
    input:
        # The merged SFT model: where preference tuning starts, hence its reference.
        model=of_sft(rules.merge_adapter.output[0]),
        train=rules.tokenize_preference_data.output.train,
        validation=rules.tokenize_preference_data.output.validation,
        test=rules.tokenize_preference_data.output.test,
        code=code(*REFERENCE_MODULES),
    output:
        logps="results/reference/{experiment}/logps.jsonl",
        info="results/reference/{experiment}/reference.json",
    log:
        "results/logs/precompute_reference_logps/{experiment}.log",
    benchmark:
        "results/benchmarks/precompute_reference_logps/{experiment}.tsv"
    conda:
        "../envs/train.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=model_memory(copies=1, default=8000),
        runtime=120,
    params:
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/precompute_reference_logps.py"


rule train_preference:
    input:
        unpack(preference_sft_adapter),
        base=preference_start,
        train=of_preference_data(rules.tokenize_preference_data.output.train),
        validation=of_preference_data(rules.tokenize_preference_data.output.validation),
        stats=of_preference_data(rules.tokenize_preference_data.output.stats),
        reference=of_preference_data(rules.precompute_reference_logps.output.logps),
        code=code("preference_train.py", "preference_settings.py", *REFERENCE_MODULES, *TRAIN_MODULES),
    output:
        adapter=directory("results/preference/{experiment}/adapter"),
        history="results/preference/{experiment}/history.json",
    log:
        "results/logs/train_preference/{experiment}.log",
    benchmark:
        "results/benchmarks/train_preference/{experiment}.tsv"
    conda:
        "../envs/train.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        # Estimated from the SFT model, the settings and the pairs (sftpipe.resources).
        mem_mb=preference_estimate("mem_mb"),
        runtime=preference_estimate("runtime"),
    params:
        settings=preference_settings,
        work_dir=lambda wildcards: f"results/preference/{wildcards.experiment}/work",
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/train_preference.py"


use rule merge_adapter as merge_preference_adapter with:
    input:
        base=preference_start,
        adapter=rules.train_preference.output.adapter,
        history=rules.train_preference.output.history,
        code=code("merge.py", "model.py", "artifacts.py"),
    output:
        directory("results/models/preference/{experiment}"),
    log:
        "results/logs/merge_preference_adapter/{experiment}.log",
    benchmark:
        "results/benchmarks/merge_preference_adapter/{experiment}.tsv"


use rule evaluate_lm_harness as evaluate_preference_lm_harness with:
    input:
        model=rules.merge_preference_adapter.output[0],
        data_files=lm_eval_data_files,
        code=code(*EVALUATE_MODULES),
    output:
        "results/eval/{experiment}/preference/lm_eval.json",
    log:
        "results/logs/evaluate_preference_lm_harness/{experiment}.log",
    benchmark:
        "results/benchmarks/evaluate_preference_lm_harness/{experiment}.tsv"


rule evaluate_preference:
    input:
        model=rules.merge_preference_adapter.output[0],
        test=of_preference_data(rules.tokenize_preference_data.output.test),
        reference=of_preference_data(rules.precompute_reference_logps.output.logps),
        code=code(*REFERENCE_MODULES),
    output:
        metrics="results/eval/{experiment}/preference/rewards.json",
        pairs="results/eval/{experiment}/preference/pairs.jsonl",
    log:
        "results/logs/evaluate_preference/{experiment}.log",
    benchmark:
        "results/benchmarks/evaluate_preference/{experiment}.tsv"
    conda:
        "../envs/eval.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=model_memory(copies=1, default=8000),
        runtime=60,
    params:
        beta=lambda wildcards: experiment_of(wildcards).preference["beta"],
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/evaluate_preference.py"
