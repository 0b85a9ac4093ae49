from sftpipe.entry import run_stage
from sftpipe.model import ModelSource, materialize_base_model

run_stage(
    snakemake,
    lambda: materialize_base_model(
        ModelSource(
            source=snakemake.params.source,
            revision=snakemake.params.revision,
            trust_remote_code=snakemake.params.trust_remote_code,
        ),
        snakemake.output[0],
    ),
)
