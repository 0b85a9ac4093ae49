"""FSDP2 (torch's `fully_shard`, parameters as DTensors) for the training stage, wherever it runs.

accelerate switches to FSDP only on GPUs and other accelerators: on CPU it drops the plugin without a
word and wraps the model in DDP. Asked for FSDP there, the Trainer's accelerator is switched to FSDP
with the plugin the Trainer built, so accelerate's own prepare shards the model with `fully_shard`
over gloo, and the Trainer's checkpoints are sharded (torch.distributed.checkpoint). A run asked to
shard checks at its first step that every parameter is sharded, and fails otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from .io import PipelineError

log = logging.getLogger("sftpipe")


def fsdp_arguments(model) -> dict[str, Any]:
    """The Trainer's FSDP2 arguments: each decoder layer its own shard unit, resharded after its
    forward, checkpoints saved as every process's shards."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": list(model._no_split_modules),
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    }


def shard_where_accelerate_does_not(trainer) -> None:
    """After the Trainer built its accelerator: FSDP where the Trainer asked for it and accelerate
    dropped it (CPU), with the mixed precision policy of the run's precision."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    # The Trainer builds its accelerator again when training starts: the check is on this one's state.
    if trainer.args.fsdp_plugin_args is None or state.distributed_type == DistributedType.FSDP:
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # Every AcceleratorState() made later (accelerate makes them anywhere) copies PartialState's
    # distributed type over its own: both say FSDP.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def unsharded_parameters(model) -> list[str]:
    """The parameters of `model` that are not DTensors sharded on their first dimension."""
    from torch.distributed.tensor import DTensor, Shard

    return [
        name
        for name, parameter in model.named_parameters()
        if not (isinstance(parameter, DTensor) and tuple(parameter.placements) == (Shard(0),))
    ]


def sharding_check():
    """A callback that fails the run at its first step unless every parameter is sharded."""
    from transformers import TrainerCallback

    class ShardingCheck(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step != 1 or model is None:
                return
            if unsharded := unsharded_parameters(model):
                raise PipelineError(
                    f"config key 'train.strategy': fsdp was asked for, but {len(unsharded)} parameters are not sharded "
                    f"(first: {unsharded[0]}); this accelerate/torch cannot shard here"
                )
            log.info("FSDP: every parameter sharded over %d processes (DTensor, Shard(0))", args.world_size)

    return ShardingCheck()


def gathered_state(model) -> dict:
    """The whole model's state, gathered from every process's shards onto the main process's CPU (the
    others get none). Every process takes part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def holdings(model, optimizer) -> dict[str, int]:
    """Bytes this process holds of the model's parameters, their gradients and the optimizer's state
    (a DTensor counts its local shard): what FSDP divides over the processes and DDP replicates."""
    import torch
    from torch.distributed.tensor import DTensor

    def size(tensors) -> int:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None]
        return sum(t.numel() * t.element_size() for t in local)

    parameters = list(model.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"parameters": size(parameters), "gradients": size(p.grad for p in parameters), "optimizer_state": size(moments)}
