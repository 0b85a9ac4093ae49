from sftpipe.entry import run_stage
from sftpipe.report import write_report

run_stage(
    snakemake,
    lambda: write_report(
        experiment=snakemake.wildcards.experiment,
        lm_eval={"base": snakemake.input.lm_eval[0], "tuned": snakemake.input.lm_eval[1]},
        exact_match={"base": snakemake.input.exact_match[0], "tuned": snakemake.input.exact_match[1]},
        history_path=snakemake.input.history,
        data_stats_path=snakemake.input.data_stats,
        manifest_paths=list(snakemake.input.manifests),
        markdown_path=snakemake.output.markdown,
        summary_path=snakemake.output.summary,
    ),
)
