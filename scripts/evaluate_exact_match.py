from sftpipe.entry import run_stage
from sftpipe.evaluate import evaluate_exact_match

run_stage(
    snakemake,
    lambda: evaluate_exact_match(
        model_dir=snakemake.input.model,
        test_path=snakemake.input.test,
        metrics_path=snakemake.output.metrics,
        predictions_path=snakemake.output.predictions,
        trust_remote_code=snakemake.params.trust_remote_code,
        gguf_file=snakemake.params.gguf_file,
        **snakemake.params.settings,
    ),
)
