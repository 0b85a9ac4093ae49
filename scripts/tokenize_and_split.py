from sftpipe.entry import run_stage
from sftpipe.tokenization import SplitSettings, tokenize_and_split

run_stage(
    snakemake,
    lambda: tokenize_and_split(
        list(snakemake.input.hydrated),
        snakemake.input.tokenizer,
        {split: snakemake.output[split] for split in ("train", "validation", "test")},
        snakemake.output.stats,
        snakemake.params.max_length,
        SplitSettings(**snakemake.params.split),
        snakemake.params.trust_remote_code,
    ),
)
