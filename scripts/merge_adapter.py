from sftpipe.entry import run_stage
from sftpipe.merge import merge_adapter

run_stage(
    snakemake,
    lambda: merge_adapter(
        base_dir=snakemake.input.base,
        adapter_dir=snakemake.input.adapter,
        out_dir=snakemake.output[0],
        dtype=snakemake.params.dtype,
        trust_remote_code=snakemake.params.trust_remote_code,
        history_path=snakemake.input.history,
    ),
)
