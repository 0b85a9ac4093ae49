# A Hub source needs the network, which cluster compute nodes often lack.
localrules:
    materialize_base_model,


rule materialize_base_model:
    input:
        local=local_model_files,
        code=CODE["materialize_base_model"],
    output:
        directory(base_model_dir("{model}")),
    log:
        "results/logs/materialize_base_model/{model}.log",
    benchmark:
        "results/benchmarks/materialize_base_model/{model}.tsv"
    conda:
        "../envs/train.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        source=lambda wildcards: {key: BASE_MODELS[wildcards.model][key] for key in ("source", "revision", "trust_remote_code")},
    script:
        "../scripts/materialize_base_model.py"
