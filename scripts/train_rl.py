from sftpipe.entry import run_stage
from sftpipe.execution import Execution
from sftpipe.jobs import TrainSettings
from sftpipe.launch import launch
from sftpipe.rl_settings import RLJob, RLSettings
from sftpipe.tracking import parse_report_to

run_stage(
    snakemake,
    lambda: launch(
        RLJob(
            base_dir=snakemake.input.base,
            train_path=snakemake.input.prompts,
            adapter_dir=snakemake.output.adapter,
            history_path=snakemake.output.history,
            work_dir=snakemake.params.work_dir,
            settings=TrainSettings(**snakemake.params.settings["train"]),
            rl=RLSettings.from_config(snakemake.params.settings["rl"]),
            trust_remote_code=snakemake.params.trust_remote_code,
            sft_adapter_dir=snakemake.input.get("sft_adapter"),
            name=f"{snakemake.wildcards.experiment}-rl",
            report_to=parse_report_to(snakemake.resources.report_to),
        ),
        # One process: the allocator is all of train's execution keys that applies to RL.
        Execution(allocator=snakemake.resources.allocator),
        threads=snakemake.threads,
    ),
)
