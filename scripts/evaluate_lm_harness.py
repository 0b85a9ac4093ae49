from sftpipe.entry import run_stage
from sftpipe.evaluate import evaluate_lm_harness
from sftpipe.tasks import TaskSpec

settings = snakemake.params.settings
run_stage(
    snakemake,
    lambda: evaluate_lm_harness(
        model_dir=snakemake.input.model,
        tasks=[TaskSpec(**task) for task in settings["tasks"]],
        out_path=snakemake.output[0],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
)
