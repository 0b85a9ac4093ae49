"""One rank of a data-parallel LoRA run, for the tests (run under torchrun): it trains through the
training recipe and saves the batches of rows it collated and its trainable weights, for the test to compare
across ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_probe.py JOB_JSON OUT_DIR
"""

import os
import sys
from pathlib import Path

import torch

from sftpipe.train import LoraRecipe, TrainJob

job, out = TrainJob.from_json(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
recipe = LoraRecipe(job)
recipe.setup()
seen = []
collate = recipe.trainer.data_collator


def recording_collator(features):
    seen.append([feature["input_ids"] for feature in features])
    return collate(features)


# The trainer builds its data loaders from this attribute when training and evaluating start.
recipe.trainer.data_collator = recording_collator
summary = recipe.train()
recipe.save(summary)
trainable = {name: p.detach().clone() for name, p in recipe.trainer.model.named_parameters() if p.requires_grad}
torch.save({"batches": seen, "trainable": trainable, "world_size": summary.world_size}, out / f"rank{os.environ['RANK']}.pt")
