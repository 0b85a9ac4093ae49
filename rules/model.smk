# A Hub source needs the network, which cluster compute nodes often lack.
localrules:
    materialize_base_model,


rule materialize_base_model:
    output:
        directory("results/models/base/{model}"),
    input:
        code=code("model.py"),
    params:
        source=config["base_model"]["source"],
        revision=config["base_model"]["revision"],
        trust_remote_code=TRUST_REMOTE_CODE,
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
