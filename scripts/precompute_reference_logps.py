from sftpipe.entry import run_stage
from sftpipe.reference import precompute_reference_logps

run_stage(
    snakemake,
    lambda: precompute_reference_logps(
        model_dir=snakemake.input.model,
        split_paths={split: snakemake.input[split] for split in ("train", "validation", "test")},
        out_path=snakemake.output.logps,
        info_path=snakemake.output.info,
        precision=snakemake.params.precision,
        trust_remote_code=snakemake.params.trust_remote_code,
        sft_adapter_dir=snakemake.input.get("sft_adapter"),
    ),
)
