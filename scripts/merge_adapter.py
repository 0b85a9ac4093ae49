from sftpipe.entry import run_stage
from sftpipe.merge import merge_adapter

run_stage(
    snakemake,
    lambda: merge_adapter(
        snakemake.input.base,
        snakemake.input.adapter,
        snakemake.output[0],
        snakemake.params.dtype,
        snakemake.params.trust_remote_code,
        snakemake.input.history,
    ),
)
