import json

from sftpipe.data import DatasetSpec, hydrate_dataset
from sftpipe.entry import run_stage

run_stage(
    snakemake,
    lambda: hydrate_dataset(
        DatasetSpec.from_config(snakemake.wildcards.dataset, json.loads(snakemake.params.dataset)),
        snakemake.input.rows,
        snakemake.output[0],
        snakemake.input.tokenizer or None,
    ),
)
