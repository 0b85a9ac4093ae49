from sftpipe.entry import run_stage
from sftpipe.report import write_summary

run_stage(
    snakemake,
    lambda: write_summary(
        report_summaries=list(snakemake.input.reports),
        out_path=snakemake.output.summary,
        comparison_path=snakemake.output.comparison,
    ),
)
