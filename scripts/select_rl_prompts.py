from sftpipe.entry import run_stage
from sftpipe.rl_prompts import write_rl_prompts

run_stage(
    snakemake,
    lambda: write_rl_prompts(
        train_path=snakemake.input.train,
        datasets=snakemake.params.datasets,
        prompts_path=snakemake.output.prompts,
        stats_path=snakemake.output.stats,
    ),
)
