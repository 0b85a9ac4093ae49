from sftpipe.entry import run_stage
from sftpipe.report import EXPORTED, VARIANTS, PreferenceInputs, ReportInputs, ReportOutputs, RLInputs, write_report

# The preference model's scores are inputs where the experiment tunes on preferences, the exported
# model's exact match where the config exports one.
variants = [variant for variant in VARIANTS if f"exact_match_{variant}" in snakemake.input.keys()]
scored = variants + [EXPORTED] * (f"exact_match_{EXPORTED}" in snakemake.input.keys())
run_stage(
    snakemake,
    lambda: write_report(
        experiment=snakemake.wildcards.experiment,
        inputs=ReportInputs(
            lm_eval={variant: snakemake.input[f"lm_eval_{variant}"] for variant in variants},
            exact_match={variant: snakemake.input[f"exact_match_{variant}"] for variant in scored},
            predictions={variant: snakemake.input[f"predictions_{variant}"] for variant in scored},
            history=snakemake.input.history,
            data_stats=snakemake.input.data_stats,
            filters=snakemake.input.filters,
            manifests=list(snakemake.input.manifests),
            preference=PreferenceInputs(
                rewards=snakemake.input.preference_rewards,
                history=snakemake.input.preference_history,
                stats=snakemake.input.preference_stats,
            )
            if "preference" in variants
            else None,
            rl=RLInputs(history=snakemake.input.rl_history, prompts=snakemake.input.rl_prompts) if "rl" in variants else None,
        ),
        outputs=ReportOutputs(**{name: snakemake.output[name] for name in ReportOutputs.__dataclass_fields__}),
        setup=snakemake.params.setup,
    ),
)
