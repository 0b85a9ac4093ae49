from sftpipe.entry import run_stage
from sftpipe.tokenization import LengthSettings, SplitSettings, tokenize_and_split

run_stage(
    snakemake,
    lambda: tokenize_and_split(
        [snakemake.input.rows],
        snakemake.input.tokenizer,
        {split: snakemake.output[split] for split in ("train", "validation", "test")},
        snakemake.output.stats,
        LengthSettings(**snakemake.params.lengths),
        SplitSettings(**snakemake.params.split),
        snakemake.params.trust_remote_code,
    ),
)
