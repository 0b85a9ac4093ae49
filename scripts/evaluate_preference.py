from sftpipe.entry import run_stage
from sftpipe.reference import evaluate_preference

run_stage(
    snakemake,
    lambda: evaluate_preference(
        model_dir=snakemake.input.model,
        test_path=snakemake.input.test,
        reference_path=snakemake.input.reference,
        reference_info_path=snakemake.input.reference_info,
        metrics_path=snakemake.output.metrics,
        pairs_path=snakemake.output.pairs,
        beta=snakemake.params.beta,
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
)
