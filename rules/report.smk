localrules:
    report,


rule report:
    output:
        markdown="results/report/{experiment}.md",
        summary="results/report/{experiment}.json",
    input:
        lm_eval=expand(rules.evaluate_lm_harness.output[0], variant=["base", "tuned"], allow_missing=True),
        exact_match=expand(
            rules.evaluate_exact_match.output.metrics, variant=["base", "tuned"], allow_missing=True
        ),
        history=rules.train_lora.output.history,
        data_stats=rules.tokenize_and_split.output.stats,
        manifests=expand(rules.download_dataset.output.manifest, dataset=DATASETS),
        code=code("report.py"),
    log:
        "results/logs/report/{experiment}.log",
    benchmark:
        "results/benchmarks/report/{experiment}.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/report.py"
