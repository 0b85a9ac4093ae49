"""One rank of a data-parallel LoRA run, for the tests (run under torchrun): it trains through the
training recipe and saves the batches of rows it collated, its trainable weights (whole) and, in its
first step, how each parameter is held: a DTensor or not, its placements, its local and
whole shapes, a checksum of the local values and the bytes each rank holds of parameters, gradients
and optimizer state.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_probe.py JOB_JSON OUT_DIR
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Shard
from transformers import TrainerCallback

from sftpipe.fsdp import holdings
from sftpipe.train import LoraRecipe, TrainJob


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Holdings(TrainerCallback):
    """How the model's parameters are held in the first step, right after the optimizer's update
    (its gradients and state are there until the next step zeroes them)."""

    seen = None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.seen is not None:
            return
        parameters = dict(model.named_parameters())
        self.seen = {
            "distributed_type": str(recipe.trainer.accelerator.distributed_type),
            "parameters": {
                name: {
                    "dtensor": isinstance(p, DTensor),
                    "sharded_on_dim_0": isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),),
                    "shape": list(p.shape),
                    "local_shape": list(_local(p).shape),
                    "local_sum": float(_local(p).detach().double().abs().sum()),
                }
                for name, p in parameters.items()
            },
            "bytes": holdings(model, optimizer),
        }


job, out = TrainJob.from_json(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
recipe = LoraRecipe(job)
probe = Holdings()
callbacks = recipe.callbacks
recipe.callbacks = lambda: [*callbacks(), probe]
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
trainable = {
    name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    for name, p in recipe.trainer.model.named_parameters()
    if p.requires_grad
}
record = {"batches": seen, "trainable": trainable, "world_size": summary.world_size, "holdings": probe.seen}
torch.save(record, out / f"rank{os.environ['RANK']}.pt")
