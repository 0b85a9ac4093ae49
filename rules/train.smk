rule train_lora:
    input:
        base=experiment_base_model,
        # Shared by the experiments with the same datasets and base model (Experiment.data_owner).
        train=of_data(rules.tokenize_and_split.output.train),
        validation=of_data(rules.tokenize_and_split.output.validation),
        stats=of_data(rules.tokenize_and_split.output.stats),
        code=CODE["train_lora"],
    output:
        adapter=directory("results/train/{experiment}/adapter"),
        history="results/train/{experiment}/history.json",
    log:
        "results/logs/train_lora/{experiment}.log",
    benchmark:
        "results/benchmarks/train_lora/{experiment}.tsv"
    conda:
        "../envs/train.yaml"
    # Capped at --cores on a workstation; on a cluster, the CPUs the job asks for.
    threads: 8
    # How the job executes, which reruns nothing: more than one GPU launches one DDP process per GPU.
    resources:
        # On one node `gpu`, the job's total; over several `gres`, per node (execution.Execution.gpu_request).
        gpu=gpu_request("gpu"),
        gres=gpu_request("gres"),
        nodes=execution_setting("nodes"),
        processes=execution_setting("processes"),
        allocator=execution_setting("allocator"),
        strategy=execution_setting("strategy"),
        report_to=report_to,
        # Estimated from the base model, the settings and the data (sftpipe.resources).
        mem_mb=training_estimate("mem_mb"),
        runtime=training_estimate("runtime"),
    params:
        settings=train_settings,
        work_dir=lambda wildcards: f"results/train/{wildcards.experiment}/work",
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/train_lora.py"


rule merge_adapter:
    input:
        base=experiment_base_model,
        adapter=rules.train_lora.output.adapter,
        history=rules.train_lora.output.history,
        code=CODE["merge_adapter"],
    output:
        directory("results/models/merged/{experiment}"),
    log:
        "results/logs/merge_adapter/{experiment}.log",
    benchmark:
        "results/benchmarks/merge_adapter/{experiment}.tsv"
    conda:
        "../envs/train.yaml"
    resources:
        mem_mb=model_memory(copies=2, default=8000),
        runtime=30,
    params:
        dtype=config["merge"]["dtype"],
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/merge_adapter.py"
