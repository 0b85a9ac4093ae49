rule train_lora:
    output:
        adapter=directory("results/train/{experiment}/adapter"),
        history="results/train/{experiment}/history.json",
    input:
        base=experiment_base_model,
        train=rules.tokenize_and_split.output.train,
        validation=rules.tokenize_and_split.output.validation,
        code=code(*TRAIN_MODULES),
    params:
        settings=train_settings,
        work_dir=lambda wildcards: f"results/train/{wildcards.experiment}/work",
        trust_remote_code=trust_remote_code,
    log:
        "results/logs/train_lora/{experiment}.log",
    benchmark:
        "results/benchmarks/train_lora/{experiment}.tsv"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    # How the job executes, which reruns nothing: more than one GPU launches one DDP process per GPU.
    resources:
        gpu=execution_setting("gpus"),
        processes=execution_setting("processes"),
        allocator=execution_setting("allocator"),
        mem_mb=16000,
        runtime=720,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/train_lora.py"


rule merge_adapter:
    output:
        directory("results/models/merged/{experiment}"),
    input:
        base=experiment_base_model,
        adapter=rules.train_lora.output.adapter,
        history=rules.train_lora.output.history,
        code=code("merge.py", "model.py", "artifacts.py"),
    params:
        dtype=config["merge"]["dtype"],
        trust_remote_code=trust_remote_code,
    log:
        "results/logs/merge_adapter/{experiment}.log",
    benchmark:
        "results/benchmarks/merge_adapter/{experiment}.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/merge_adapter.py"
