from sftpipe.entry import run_stage
from sftpipe.tasks import TaskSpec, prepare_task_data

run_stage(
    snakemake,
    lambda: prepare_task_data(
        spec=TaskSpec(**snakemake.params.task),
        out_dir=snakemake.output[0],
        mirror_dir=snakemake.params.mirror_dir,
    ),
)
