"""Sharded training with PyTorch FSDP2 (`fully_shard`): the model split across the processes per decoder layer.

`train.distributed: fsdp` shards every decoder layer and then the root (embeddings, final norm, a tied or
separate LM head) over all processes: each holds 1/N of every parameter, of its gradient and of AdamW's state,
and a layer's full weights exist only while it runs (all-gathered in forward and backward, gradients
reduce-scattered after backward, averaged over the processes as DDP averages them). Under `bf16` precision the
all-gathered weights are cast to bf16 (FSDP's MixedPrecisionPolicy) while the shards, the optimizer and the
gradient reduction stay fp32.

Outside forward and backward a sharded model's parameters are DTensors whose local part is this process's
shard. Mitigations work on those local shards (`local`): a penalty summed over the local shards has its
exact gradient on them (it does not pass the reduce-scatter, so it is not averaged), which is what a
per-parameter penalty needs. What must see whole tensors gathers them one at a time (`full`,
`full_tensors`), never a whole model.

Every forward of a sharded model is a collective: all processes must call it the same number of times
(the loop pads a process that has fewer micro-batches with an empty one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from forgetting.harness.errors import UserError


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded parameter (autograd flows to the parameter), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from the shards (every process must call this), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's part of `whole`, a tensor shaped like the (possibly sharded) `param`, on param's device."""
    if isinstance(param, DTensor):
        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements).to_local()
    return whole.to(param.device)


def gather_like(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose shard `part` is, sharded as `param` (every process calls), or `part` itself."""
    return _as_sharded(part, param).full_tensor() if isinstance(param, DTensor) else part


def _as_sharded(part: torch.Tensor, param: DTensor) -> DTensor:
    """The DTensor whose local part on this process is `part`, sharded as `param`."""
    return DTensor.from_local(part, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def global_stats(parts: list[torch.Tensor], model: torch.nn.Module) -> tuple[float, float]:
    """(mean, max) over every element of `parts`, over all processes' shards when `model` is sharded."""
    if not is_sharded(model):
        flat = torch.cat([p.flatten() for p in parts])
        return float(flat.mean()), float(flat.max())
    device = parts[0].device  # collectives of a GPU process group take GPU tensors
    total = torch.tensor(
        [sum(float(p.double().sum()) for p in parts), sum(p.numel() for p in parts)], device=device, dtype=torch.float64
    )
    largest = torch.tensor(max((float(p.max()) for p in parts if p.numel()), default=-math.inf), device=device)
    dist.all_reduce(total)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(total[0] / total[1]), float(largest)


def add_to_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.grad += value, where `value` is this process's part of the gradient (the whole of it unsharded)."""
    if param.grad is None:
        param.grad = _as_sharded(value, param) if isinstance(param, DTensor) else value
    else:
        local(param.grad).add_(value)


def local_sum(value: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """A sum taken over local shards, summed over the processes (the whole model's value); every process calls."""
    if is_sharded(model):
        value = value.detach().clone()
        dist.all_reduce(value)  # a sum of shards: each element counted once
    return value


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes transformers names in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"train.distributed=fsdp: cannot find the decoder layers of {type(model).__name__} "
            f"(transformers lists none in _no_split_modules); use train.distributed=ddp"
        )
    return layers


def compute_dtype(accelerator) -> torch.dtype | None:
    """The dtype a sharded model's gathered weights are cast to for compute: that of the mixed precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def shard_model(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard `model` in place over the processes: each decoder layer, then the root (`fully_shard`).

    The main process passes the loaded model (on the CPU), the others the same architecture on the meta device
    (`harness.models.empty_model`; a loaded one works too, its weights are replaced): no process but the main one
    need ever hold the whole model, and it only in CPU memory. Each layer moves to `device` as it is sharded; the
    main process's weights, then the buffers (rotary tables and the like, which no state dict holds), are
    broadcast into every process's shards.
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    kwargs = {"mp_policy": policy} if policy else {}
    on_meta, main = any(p.is_meta for p in model.parameters()), dist.get_rank() == 0
    if on_meta and main:
        raise ValueError("shard_model: the main process passes the loaded model (the others may pass an empty one)")
    whole = dict(model.state_dict()) if main else {}  # the main process's CPU tensors, kept for the broadcast
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if on_meta:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU of the main process ({} elsewhere); every process calls this."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        # a tied parameter (an LM head sharing the embeddings) is gathered once per name: alias the copies so
        # that save_pretrained sees one tensor, as it does for an unsharded model
        name = name.replace("._checkpoint_wrapped_module", "")
        if name in state and first.setdefault(id(param), name) != name:
            state[name] = state[first[id(param)]]
    return state


def full_tensors(named: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor on the CPU), gathered one at a time; every process iterates (collectives inside)."""
    for name, tensor in named:
        yield name, full(tensor.detach()).cpu()
