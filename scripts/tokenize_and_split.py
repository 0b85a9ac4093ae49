from sftpipe.entry import run_stage
from sftpipe.splits import SplitSettings
from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split

run_stage(
    snakemake,
    lambda: tokenize_and_split(
        hydrated_paths=[snakemake.input.rows],
        tokenizer_dir=snakemake.input.tokenizer,
        out_paths={split: snakemake.output[split] for split in SPLITS},
        stats_path=snakemake.output.stats,
        lengths=LengthSettings(**snakemake.params.lengths),
        split=SplitSettings(**snakemake.params.split),
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
)
