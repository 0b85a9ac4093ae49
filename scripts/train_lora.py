from sftpipe.entry import run_stage
from sftpipe.train import TrainSettings, train

run_stage(
    snakemake,
    lambda: train(
        snakemake.input.base,
        snakemake.input.train,
        snakemake.input.validation,
        snakemake.output.adapter,
        snakemake.output.history,
        TrainSettings(**snakemake.params.settings),
        snakemake.params.work_dir,
        snakemake.params.trust_remote_code,
        snakemake.threads,
    ),
)
