from sftpipe.data import DatasetSpec, hydrate_dataset
from sftpipe.entry import run_stage

run_stage(
    snakemake,
    lambda: hydrate_dataset(
        spec=DatasetSpec.from_config(snakemake.wildcards.dataset, snakemake.params.dataset),
        raw_path=snakemake.input.rows,
        out_path=snakemake.output[0],
        tokenizer_dir=snakemake.input.tokenizer or None,
    ),
)
