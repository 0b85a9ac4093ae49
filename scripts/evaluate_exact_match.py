from sftpipe.entry import run_stage
from sftpipe.evaluate import exact_match_eval

run_stage(
    snakemake,
    lambda: exact_match_eval(
        snakemake.input.model,
        snakemake.input.test,
        snakemake.output.metrics,
        snakemake.output.predictions,
        trust_remote_code=snakemake.params.trust_remote_code,
        **snakemake.params.settings,
    ),
)
