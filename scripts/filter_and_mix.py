from sftpipe.entry import run_stage
from sftpipe.filters import FilterSettings, filter_and_mix
from sftpipe.splits import SplitSettings
from sftpipe.tasks import TaskSpec

run_stage(
    snakemake,
    lambda: filter_and_mix(
        hydrated_paths=list(snakemake.input.hydrated),
        weights=snakemake.params.weights,
        out_path=snakemake.output.rows,
        stats_path=snakemake.output.stats,
        removed_path=snakemake.output.removed,
        settings=FilterSettings(**snakemake.params.filters),
        split=SplitSettings(**snakemake.params.split),
        eval_tasks=[TaskSpec(**task) for task in snakemake.params.eval_tasks],
        threads=snakemake.threads,
        # One held-out file (the preference pairs' SFT rows) arrives as a path, not a list of them.
        held_out_paths=[snakemake.input.held_out] if "held_out" in snakemake.input.keys() else [],
    ),
)
