from sftpipe.entry import run_stage
from sftpipe.report import EXPORTED, VARIANTS, ReportInputs, ReportOutputs, write_report

# The exported model's exact match is an input where the config exports one.
SCORED = [variant for variant in (*VARIANTS, EXPORTED) if f"exact_match_{variant}" in snakemake.input.keys()]

run_stage(
    snakemake,
    lambda: write_report(
        experiment=snakemake.wildcards.experiment,
        inputs=ReportInputs(
            lm_eval={variant: snakemake.input[f"lm_eval_{variant}"] for variant in VARIANTS},
            exact_match={variant: snakemake.input[f"exact_match_{variant}"] for variant in SCORED},
            predictions={variant: snakemake.input[f"predictions_{variant}"] for variant in SCORED},
            history=snakemake.input.history,
            data_stats=snakemake.input.data_stats,
            filters=snakemake.input.filters,
            manifests=list(snakemake.input.manifests),
        ),
        outputs=ReportOutputs(**{name: snakemake.output[name] for name in ReportOutputs.__dataclass_fields__}),
        setup=snakemake.params.setup,
    ),
)
