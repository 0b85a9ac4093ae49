# Downloads need the network, which cluster compute nodes often lack.
localrules:
    download_dataset,
    prepare_eval_data,
    build_demo_choice_task,


rule download_dataset:
    input:
        local=lambda wildcards: local_dataset_files(wildcards.dataset),
        code=code(*DATA_MODULES),
    output:
        rows="results/data/raw/{dataset}.jsonl",
        manifest="results/data/raw/{dataset}.manifest.json",
    log:
        "results/logs/download_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/download_dataset/{dataset}.tsv"
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        dataset=lambda wildcards: dataset_config(wildcards.dataset, without=("template", "weight")),
        mirror_dir=lambda wildcards: hub_mirror(wildcards.dataset),
    script:
        "../scripts/download_dataset.py"


rule hydrate_dataset:
    input:
        rows=rules.download_dataset.output.rows,
        tokenizer=lambda wildcards: (
            base_model_dir(wildcards.renderer.removeprefix("chat-")) if wildcards.renderer.startswith("chat-") else []
        ),
        code=code(*DATA_MODULES),
    output:
        # The renderer is the named template, `chat-<model>` for the base model whose own chat template
        # renders the rows, or `user-<hash>` for the config's Jinja templates.
        "results/data/hydrated/{renderer}/{dataset}.jsonl",
    log:
        "results/logs/hydrate_dataset/{renderer}/{dataset}.log",
    benchmark:
        "results/benchmarks/hydrate_dataset/{renderer}/{dataset}.tsv"
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dataset=lambda wildcards: dataset_config(wildcards.dataset, without=("weight",)),
    script:
        "../scripts/hydrate_dataset.py"


rule filter_and_mix:
    input:
        hydrated=hydrated_rows,
        # Decontamination reads the configured evaluation sets.
        eval_data=lm_eval_data_files,
        code=code("filters.py", "dedup.py", "decontamination.py", "mixing.py", "splits.py", "words.py", *TASK_MODULES),
    output:
        rows="results/data/mixed/{experiment}.jsonl",
        stats="results/data/mixed/{experiment}.filters.json",
        removed="results/data/mixed/{experiment}.removed.jsonl",
    log:
        "results/logs/filter_and_mix/{experiment}.log",
    benchmark:
        "results/benchmarks/filter_and_mix/{experiment}.tsv"
    conda:
        "../envs/data.yaml"
    # Processes computing MinHash signatures; capped at --cores on a workstation.
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        filters=config["data"]["filters"],
        weights=lambda wildcards: dataset_weights(experiment_of(wildcards).datasets),
        split=config["data"]["split"],
        # Only what names the evaluation data: a change of limit or few-shot reruns no data stage.
        eval_tasks=[{"name": t["name"], "data_dir": t["data_dir"]} for t in LM_EVAL_SETTINGS["tasks"]],
    script:
        "../scripts/filter_and_mix.py"


rule tokenize_and_split:
    input:
        rows=rules.filter_and_mix.output.rows,
        tokenizer=experiment_base_model,
        code=code("tokenization.py", "splits.py", "model.py"),
    output:
        train="results/data/tokenized/{experiment}/train.jsonl",
        validation="results/data/tokenized/{experiment}/validation.jsonl",
        test="results/data/tokenized/{experiment}/test.jsonl",
        stats="results/data/tokenized/{experiment}/stats.json",
    log:
        "results/logs/tokenize_and_split/{experiment}.log",
    benchmark:
        "results/benchmarks/tokenize_and_split/{experiment}.tsv"
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        lengths={key: config["data"][key] for key in ("max_length", "min_tokens", "overlong")},
        split=config["data"]["split"],
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/tokenize_and_split.py"


rule prepare_eval_data:
    input:
        local=eval_task_source_files,
        code=code(*TASK_MODULES),
    output:
        directory(eval_data_dir("{task}")),
    log:
        "results/logs/prepare_eval_data/{task}.log",
    benchmark:
        "results/benchmarks/prepare_eval_data/{task}.tsv"
    conda:
        "../envs/eval.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        # The user's files, or the splits to fetch, which depend on the task and on whether it is
        # few-shot; not on its limit.
        task=lambda wildcards: {key: EVAL_TASKS[wildcards.task].get(key) for key in ("name", "num_fewshot", "data_files")},
        mirror_dir=lambda wildcards: None if EVAL_TASKS[wildcards.task].get("data_files") else config["data"]["mirror_dir"],
    script:
        "../scripts/prepare_eval_data.py"


rule build_demo_choice_task:
    input:
        code=code("demo.py"),
    output:
        "results/data/lm_eval/sftpipe_demo_mc.jsonl",
    log:
        "results/logs/build_demo_choice_task/sftpipe_demo_mc.log",
    benchmark:
        "results/benchmarks/build_demo_choice_task/sftpipe_demo_mc.tsv"
    conda:
        "../envs/data.yaml"
    params:
        task={"count": config["eval"]["demo_choice_task"]["rows"], "seed": config["eval"]["demo_choice_task"]["seed"]},
    script:
        "../scripts/build_demo_choice_task.py"
