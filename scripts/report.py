from sftpipe.entry import run_stage
from sftpipe.report import ReportInputs, ReportOutputs, write_report


def by_variant(paths):
    return dict(zip(("base", "tuned"), paths))


run_stage(
    snakemake,
    lambda: write_report(
        snakemake.wildcards.experiment,
        ReportInputs(
            lm_eval=by_variant(snakemake.input.lm_eval),
            exact_match=by_variant(snakemake.input.exact_match),
            predictions=by_variant(snakemake.input.predictions),
            history=snakemake.input.history,
            data_stats=snakemake.input.data_stats,
            filters=snakemake.input.filters,
            manifests=list(snakemake.input.manifests),
        ),
        ReportOutputs(**{name: snakemake.output[name] for name in ReportOutputs.__dataclass_fields__}),
        snakemake.params.setup,
    ),
)
