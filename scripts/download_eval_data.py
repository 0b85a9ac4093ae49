from sftpipe.entry import run_stage
from sftpipe.evaluate import TaskSpec, download_task_data

run_stage(
    snakemake,
    lambda: download_task_data(TaskSpec(**snakemake.params.task), snakemake.output[0], snakemake.params.mirror_dir),
)
