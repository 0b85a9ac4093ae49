from sftpipe.data import DatasetSpec, download_dataset
from sftpipe.entry import run_stage

run_stage(
    snakemake,
    lambda: download_dataset(
        spec=DatasetSpec.from_config(snakemake.wildcards.dataset, snakemake.params.dataset, template_required=False),
        out_path=snakemake.output.rows,
        manifest_path=snakemake.output.manifest,
        mirror_dir=snakemake.params.mirror_dir,
    ),
)
