localrules:
    report,
    summarize_experiments,


rule report:
    input:
        unpack(exported_exact_match),
        unpack(preference_report_inputs),
        unpack(rl_report_inputs),
        # An experiment may share its data and SFT stages with another (Experiment.data_owner, .sft_owner).
        lm_eval_base=lambda wildcards: rules.evaluate_base_lm_harness.output[0].format(model=experiment_of(wildcards).model),
        lm_eval_tuned=of_sft(rules.evaluate_lm_harness.output[0]),
        exact_match_base=of_variant(rules.evaluate_exact_match.output.metrics, "base"),
        exact_match_tuned=of_variant(rules.evaluate_exact_match.output.metrics, "tuned"),
        predictions_base=of_variant(rules.evaluate_exact_match.output.predictions, "base"),
        predictions_tuned=of_variant(rules.evaluate_exact_match.output.predictions, "tuned"),
        history=of_sft(rules.train_lora.output.history),
        data_stats=of_data(rules.tokenize_and_split.output.stats),
        filters=of_data(rules.filter_and_mix.output.stats),
        manifests=lambda wildcards: expand(
            rules.download_dataset.output.manifest, dataset=EXPERIMENT_DATASETS[wildcards.experiment]
        ),
        code=CODE["report"],
    output:
        markdown="results/report/{experiment}.md",
        summary="results/report/{experiment}.json",
        loss_curves=report(
            "results/report/{experiment}/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Training",
            labels={"experiment": "{experiment}", "artifact": "loss curves"},
        ),
        eval_comparison=report(
            "results/report/{experiment}/eval_comparison.png",
            caption="../report/eval_comparison.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "artifact": "scores"},
        ),
        exact_match_table=report(
            "results/report/{experiment}/exact_match.html",
            caption="../report/exact_match.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "artifact": "exact match"},
        ),
        sample_generations=report(
            "results/report/{experiment}/sample_generations.html",
            caption="../report/sample_generations.rst",
            category="Evaluation",
            labels={"experiment": "{experiment}", "artifact": "sample generations"},
        ),
        token_lengths=report(
            "results/report/{experiment}/token_lengths.png",
            caption="../report/token_lengths.rst",
            category="Data",
            labels={"experiment": "{experiment}", "artifact": "token lengths"},
        ),
        data_table=report(
            "results/report/{experiment}/data.html",
            caption="../report/data_stats.rst",
            category="Data",
            labels={"experiment": "{experiment}", "artifact": "data"},
        ),
        training_rows=report(
            "results/report/{experiment}/training_rows.html",
            caption="../report/training_rows.rst",
            category="Data",
            labels={"experiment": "{experiment}", "artifact": "training rows"},
        ),
    log:
        "results/logs/report/{experiment}.log",
    benchmark:
        "results/benchmarks/report/{experiment}.tsv"
    conda:
        "../envs/report.yaml"
    params:
        setup=lambda wildcards: experiment_of(wildcards).describe(),
    script:
        "../scripts/report.py"


rule summarize_experiments:
    input:
        reports=expand(rules.report.output.summary, experiment=EXPERIMENTS),
        code=CODE["report"],
    output:
        summary="results/summary.json",
        comparison=report(
            "results/report/experiments.html",
            caption="../report/experiments.rst",
            category="Experiments",
        ),
    log:
        "results/logs/summarize_experiments/summary.log",
    benchmark:
        "results/benchmarks/summarize_experiments/summary.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/summarize_experiments.py"
