from sftpipe.entry import run_stage
from sftpipe.report import write_summary

run_stage(
    snakemake,
    lambda: write_summary(list(snakemake.input.reports), snakemake.output.summary, snakemake.output.comparison),
)
