"""--fsdp: one run sharded across the ranks of torchrun with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard),
for a base that does not fit one device whole (data parallel, train.py's default, replicates it on every rank).

Every decoder layer is one FSDP2 unit and the root (embeddings, final norm, head) another. Each rank keeps 1/N of
every tensor of a unit: the packed NF4 bytes and their quantization state (absmax, code books: made parameters
without gradient, as FSDP2 shards parameters only), the 16-bit weights and the LoRA weights, hence also the
LoRA gradients and AdamW states. A unit's whole tensors exist only while it computes: all-gathered before its
forward (and its checkpointed recompute) and again before its backward, freed after. The rules:
  - no rank holds the whole base, not even while loading: the model is built on the meta device and sharded,
    then each rank reads the checkpoint one tensor at a time and keeps its slices (load_weights);
  - gradients are reduce-scattered as sums, never averages: train.py's loss weights already divide by the
    tokens of all ranks, as under data parallel, so the update is the single-process one of the global batch;
  - the gradient norm for clipping is the norm over every rank's shards (clip_grad_norm_ of sharded tensors),
    and fp16's overflow check is agreed by all ranks (ShardedGradScaler): every rank skips the same steps;
  - the adapter is gathered (every rank takes part) and written by rank 0: the PEFT folder of a one-process run;
  - a checkpoint's LoRA weights and AdamW states stay sharded: torch.distributed.checkpoint writes every rank's
    shards into `.checkpoint-<step>.tmp-sharded`, which rank 0 moves into the checkpoint before renaming it
    into place (checkpoint.py: atomic like every checkpoint). Resuming needs the same world size, as the data
    order and the dropout RNGs are per rank (--resume refuses another one).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # noqa: F401  (train.py's fp16 scaler)

from infra import hf
from lora import LoRALinear, adapter_parameters
from model import RMSNorm
from quant import Linear4bit

NF4_TENSORS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")   # Linear4bit's buffers
SHARDED = "sharded"         # the checkpoint's folder of torch.distributed.checkpoint shards
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)    # the base is the base model's, never saved
LOAD_TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)    # (dcp.load checked every key)


def shard(model: nn.Module) -> list[nn.Parameter]:
    """Shard `model` in place across the ranks (collective); returns its trainable parameters, now sharded."""
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for name in NF4_TENSORS:
                t = m._buffers.pop(name)
                if t is not None:
                    m.register_parameter(name, nn.Parameter(t, requires_grad=False))
    # One reduce-scatter per unit needs one gradient dtype: LoRA+'s 16-bit norms beside fp32 LoRA get their own.
    mixed = len({p.dtype for p in model.parameters() if p.requires_grad}) > 1
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)] if mixed else []
    for unit in [*norms, *model.layers, model]:
        fully_shard(unit)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)     # a plain sum (gloo has no pre-multiplied one)
    register_fsdp_forward_method(model, "loss")          # train_step calls model.loss, not forward
    return [p for p in model.parameters() if p.requires_grad]


def load_weights(model: nn.Module, path, dtype, device, seed: int, quant_backend: str = "auto") -> None:
    """Fill `model`, built on the meta device and sharded, from the HF checkpoint in `path`: each rank reads one
    tensor at a time, whole, quantizes a decoder linear as hf.load_model does (NF4's second-level offset is the
    mean over the whole tensor) and keeps only its slices; so a rank's host memory stays near one 16-bit tensor
    plus its shards. Then LoRA's initialisation, as add_lora draws it from `seed` in one process."""
    model.to_empty(device=device)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor, file in hf.read_tensors(hf.checkpoint_files(path)):
            key = hf.our_key(name)
            base = modules.get(key.removesuffix(".weight") + ".base_layer")     # a decoder linear under LoRA
            if ".weight." in name:                       # bitsandbytes' statistics (hf._weight_name)
                raise ValueError(f"{file}: {name}: --fsdp reads 16-bit checkpoints, not bitsandbytes' NF4 ones")
            if key not in params and base is None:
                continue                                 # a tied lm_head: it is the embedding
            hf.check_finite(tensor, name, file, dtype)
            tensor = tensor.to(device=device, dtype=dtype)
            if isinstance(base, Linear4bit):
                nf4 = Linear4bit.from_weight(tensor, compute_dtype=dtype, backend=quant_backend)
                base._meta = nf4._meta                   # the shape and the offset: the same on every rank
                for attr in NF4_TENSORS:
                    keep(getattr(base, attr), getattr(nf4, attr))
            else:
                keep(params[key] if base is None else base.weight, tensor)
            del tensor
        torch.manual_seed(seed)          # add_lora's order: every q_proj's A, then every k_proj's A, ...
        for target in model.lora_config["targets"]:
            for name, m in modules.items():
                if isinstance(m, LoRALinear) and name.rsplit(".", 1)[-1] == target:
                    a = torch.empty(m.lora_A.shape, device=device)
                    keep(m.lora_A, nn.init.kaiming_uniform_(a, a=math.sqrt(5)))
                    keep(m.lora_B, torch.zeros(m.lora_B.shape, device=device))


def keep(param, full: torch.Tensor) -> None:
    """This rank's slice of `full` into the sharded `param`: FSDP2 cuts dim 0 as torch.chunk does."""
    chunks = full.chunk(dist.get_world_size())
    if dist.get_rank() < len(chunks):
        param.to_local().copy_(chunks[dist.get_rank()])


def gather_adapter(model: nn.Module) -> dict | None:
    """The trained tensors, whole, on rank 0's host (None elsewhere): what save_adapter writes. Collective."""
    full = {}
    for key, p in adapter_parameters(model).items():
        t = p.full_tensor().cpu()
        if dist.get_rank() == 0:
            full[key] = t
    return full if dist.get_rank() == 0 else None


def staging(out: Path, step: int) -> Path:
    """Where the ranks write the shards of checkpoint-<step> (a temporary that remove_temporaries clears)."""
    return out / f".checkpoint-{step}.tmp-{SHARDED}"


def save_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Every rank's shards of the LoRA weights and AdamW states into `folder` (collective)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINABLE_ONLY)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder)


def load_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """The shards save_sharded wrote, back into the model's LoRA weights and the optimizer (collective)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINABLE_ONLY)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as e:      # a missing or damaged shard surfaces as one of several error types
        raise ValueError(f"{folder}: cannot read the sharded state, damaged? ({str(e).splitlines()[0]}); delete "
                         f"{folder.parent} to resume from the checkpoint before it") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=LOAD_TRAINABLE)
