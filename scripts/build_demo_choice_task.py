from sftpipe.demo import write_demo_choice_task
from sftpipe.entry import run_stage

run_stage(
    snakemake,
    lambda: write_demo_choice_task(out_path=snakemake.output[0], **snakemake.params.task),
)
