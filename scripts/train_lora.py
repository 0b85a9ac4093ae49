from sftpipe.entry import run_stage
from sftpipe.execution import Execution
from sftpipe.jobs import TrainJob, TrainSettings
from sftpipe.launch import launch
from sftpipe.tracking import parse_report_to

run_stage(
    snakemake,
    lambda: launch(
        TrainJob(
            base_dir=snakemake.input.base,
            train_path=snakemake.input.train,
            validation_path=snakemake.input.validation,
            adapter_dir=snakemake.output.adapter,
            history_path=snakemake.output.history,
            work_dir=snakemake.params.work_dir,
            settings=TrainSettings(**snakemake.params.settings),
            trust_remote_code=snakemake.params.trust_remote_code,
            name=snakemake.wildcards.experiment,
            report_to=parse_report_to(snakemake.resources.report_to),
        ),
        Execution.of_job(snakemake.resources),
        threads=snakemake.threads,
    ),
)
