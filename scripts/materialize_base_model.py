from sftpipe.entry import run_stage
from sftpipe.model import ModelSource, materialize_base_model

run_stage(
    snakemake,
    lambda: materialize_base_model(source=ModelSource(**snakemake.params.source), out_dir=snakemake.output[0]),
)
