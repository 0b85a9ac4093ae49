from sftpipe.entry import run_stage
from sftpipe.tasks import TaskSpec, prepare_task_data

run_stage(
    snakemake,
    lambda: prepare_task_data(TaskSpec(**snakemake.params.task), snakemake.output[0], snakemake.params.mirror_dir),
)
