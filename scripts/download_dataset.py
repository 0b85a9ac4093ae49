import json

from sftpipe.data import DatasetSpec, download_dataset
from sftpipe.entry import run_stage

run_stage(
    snakemake,
    lambda: download_dataset(
        DatasetSpec.from_config(snakemake.wildcards.dataset, json.loads(snakemake.params.dataset), template_required=False),
        snakemake.output.rows,
        snakemake.output.manifest,
        snakemake.params.mirror_dir,
    ),
)
