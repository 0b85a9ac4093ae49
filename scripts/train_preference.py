from sftpipe.entry import run_stage
from sftpipe.preference_settings import PreferenceSettings
from sftpipe.preference_train import PreferenceJob, train_preference
from sftpipe.train import TrainSettings

run_stage(
    snakemake,
    lambda: train_preference(
        PreferenceJob(
            base_dir=snakemake.input.base,
            train_path=snakemake.input.train,
            validation_path=snakemake.input.validation,
            reference_path=snakemake.input.reference,
            reference_info_path=snakemake.input.reference_info,
            adapter_dir=snakemake.output.adapter,
            history_path=snakemake.output.history,
            work_dir=snakemake.params.work_dir,
            settings=TrainSettings(**snakemake.params.settings["train"]),
            preference=PreferenceSettings(**snakemake.params.settings["preference"]),
            trust_remote_code=snakemake.params.trust_remote_code,
            sft_adapter_dir=snakemake.input.get("sft_adapter"),
            name=snakemake.wildcards.experiment,
        )
    ),
)
