rule evaluate_lm_harness:
    input:
        model=rules.merge_adapter.output[0],
        data_files=lm_eval_data_files,
        code=CODE["evaluate"],
    output:
        "results/eval/{experiment}/tuned/lm_eval.json",
    log:
        "results/logs/evaluate_lm_harness/{experiment}/tuned.log",
    benchmark:
        "results/benchmarks/evaluate_lm_harness/{experiment}/tuned.tsv"
    conda:
        "../envs/eval.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=model_memory(copies=1, default=8000),
        runtime=240,
    params:
        settings=LM_EVAL_SETTINGS,
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/evaluate_lm_harness.py"


# The base model's scores depend on the model alone, so the experiments that share it share them.
use rule evaluate_lm_harness as evaluate_base_lm_harness with:
    input:
        model=base_model_dir("{model}"),
        data_files=lm_eval_data_files,
        code=CODE["evaluate"],
    output:
        "results/eval/base_model/{model}/lm_eval.json",
    log:
        "results/logs/evaluate_base_lm_harness/{model}.log",
    benchmark:
        "results/benchmarks/evaluate_base_lm_harness/{model}.tsv"
    params:
        settings=LM_EVAL_SETTINGS,
        trust_remote_code=base_model_setting("trust_remote_code"),


rule evaluate_exact_match:
    input:
        model=evaluated_model,
        test=evaluated_test_rows,
        code=CODE["evaluate"],
    output:
        metrics="results/eval/{experiment}/{variant}/exact_match.json",
        predictions="results/eval/{experiment}/{variant}/predictions.jsonl",
    log:
        "results/logs/evaluate_exact_match/{experiment}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_exact_match/{experiment}/{variant}.tsv"
    conda:
        "../envs/eval.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=model_memory(copies=1, default=8000),
        runtime=120,
    params:
        settings=config["eval"]["exact_match"],
        trust_remote_code=trust_remote_code,
        gguf_file=evaluated_gguf_file,
    script:
        "../scripts/evaluate_exact_match.py"
