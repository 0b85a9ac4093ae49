rule evaluate_lm_harness:
    output:
        "results/eval/{experiment}/{variant}/lm_eval.json",
    input:
        model=evaluated_model,
        data_files=lm_eval_data_files,
        code=code("evaluate.py", "model.py", "data.py"),
    params:
        settings=config["eval"]["lm_eval"],
        mirror_dir=config["data"]["mirror_dir"],
        trust_remote_code=TRUST_REMOTE_CODE,
    log:
        "results/logs/evaluate_lm_harness/{experiment}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_lm_harness/{experiment}/{variant}.tsv"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate_lm_harness.py"


rule evaluate_exact_match:
    output:
        metrics="results/eval/{experiment}/{variant}/exact_match.json",
        predictions="results/eval/{experiment}/{variant}/predictions.jsonl",
    input:
        model=evaluated_model,
        test=rules.tokenize_and_split.output.test,
        code=code("evaluate.py", "model.py"),
    params:
        settings=config["eval"]["exact_match"],
        trust_remote_code=TRUST_REMOTE_CODE,
    log:
        "results/logs/evaluate_exact_match/{experiment}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_exact_match/{experiment}/{variant}.tsv"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate_exact_match.py"
