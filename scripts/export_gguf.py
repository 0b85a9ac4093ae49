from sftpipe.entry import run_stage
from sftpipe.export import export_gguf

run_stage(
    snakemake,
    lambda: export_gguf(
        model_dir=snakemake.input.model,
        out_dir=snakemake.output[0],
        name=snakemake.wildcards.experiment,
        trust_remote_code=snakemake.params.trust_remote_code,
        **snakemake.params.settings,
    ),
)
