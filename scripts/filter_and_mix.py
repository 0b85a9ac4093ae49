from sftpipe.entry import run_stage
from sftpipe.filters import FilterSettings, filter_and_mix
from sftpipe.tasks import TaskSpec
from sftpipe.tokenization import SplitSettings

run_stage(
    snakemake,
    lambda: filter_and_mix(
        dict(zip(snakemake.params.weights, snakemake.input.hydrated)),
        snakemake.params.weights,
        snakemake.output.rows,
        snakemake.output.stats,
        snakemake.output.removed,
        FilterSettings(**snakemake.params.filters),
        SplitSettings(**snakemake.params.split),
        [TaskSpec(**task) for task in snakemake.params.eval_tasks],
    ),
)
