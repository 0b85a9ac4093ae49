# A Hub source needs the network, which cluster compute nodes often lack.
localrules:
    materialize_base_model,


rule materialize_base_model:
    output:
        directory(base_model_dir("{model}")),
    input:
        local=local_model_files,
        code=code("model.py"),
    params:
        source=base_model_setting("source"),
        revision=base_model_setting("revision"),
        trust_remote_code=base_model_setting("trust_remote_code"),
    log:
        "results/logs/materialize_base_model/{model}.log",
    benchmark:
        "results/benchmarks/materialize_base_model/{model}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/materialize_base_model.py"
