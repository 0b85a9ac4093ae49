# The first export on a machine fetches llama.cpp's converter from PyPI, which compute nodes often cannot reach.
localrules:
    export_gguf,


rule export_gguf:
    input:
        model=rules.merge_adapter.output[0],
        code=CODE["export_gguf"],
    output:
        directory("results/export/{experiment}"),
    log:
        "results/logs/export_gguf/{experiment}.log",
    benchmark:
        "results/benchmarks/export_gguf/{experiment}.tsv"
    conda:
        "../envs/export.yaml"
    resources:
        mem_mb=model_memory(copies=2, default=8000),
        runtime=60,
    params:
        settings=config["export"],
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/export_gguf.py"
