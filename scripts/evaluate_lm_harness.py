from sftpipe.entry import run_stage
from sftpipe.tasks import TaskSpec
from sftpipe.evaluate import lm_eval_tasks

settings = snakemake.params.settings
run_stage(
    snakemake,
    lambda: lm_eval_tasks(
        snakemake.input.model,
        [TaskSpec(**task) for task in settings["tasks"]],
        snakemake.output[0],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
)
