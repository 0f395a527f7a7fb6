"""PEFT LoRA adapter folders <-> the LoRA of our model (lora.py): the format adapters are shared in.

    adapter_config.json           r, lora_alpha, lora_dropout, target_modules (PEFT's LoraConfig)
    adapter_model.safetensors     base_model.model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r)
    trainable_params.safetensors  LoRA+ embeddings and norms under their HF names, as LongLoRA saves them
    longqlora.json                the RoPE scaling and context the adapter was trained with (PEFT ignores it)

save_adapter / load_adapter move a model's adapter to / from a folder; read_adapter is the file level (the merge
reads an adapter without a model). Ours, PEFT's and LongLoRA's folders load (`.bin` files of older versions too),
every field and tensor checked before the model is touched.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from infra import atomic
from infra.hf import hf_key, load_json, our_key, read_tensor_file, save_safetensors
from lora import LoRALinear, adapter_parameters, add_lora, is_embed_or_norm
from quant import Linear4bit
from infra.rope_scaling import normalize_rope_scaling

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"        # (or adapter_model.bin: older PEFT)
TRAINABLE_PARAMS = "trainable_params.safetensors"     # LoRA+ embeddings and norms, as LongLoRA saves them (or .bin)
TRAINING_INFO = "longqlora.json"      # how the adapter was trained: its RoPE scaling and context
# PEFT wraps the HF model twice (PeftModel.base_model = LoraModel, LoraModel.model = LlamaForCausalLM)
PEFT_PREFIX = "base_model.model."
_PEFT_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)(\.default)?\.weight$")
# PEFT options that change the computation; refusing beats silently computing something else
_UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                "layers_to_transform")


def peft_key(key: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return PEFT_PREFIX + hf_key(key) + ".weight"


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path=None, training: dict | None = None,
                 tensors: dict | None = None) -> Path:
    """Write the adapter as a PEFT folder (PeftModel.from_pretrained loads it), atomically: lora_A/lora_B to
    adapter_model.safetensors, anything else (LoRA+ embeddings and norms) to trainable_params.safetensors with HF
    names, as LongLoRA does. training: how it was trained ({"rope_scaling", "ctx", ...}, saved as longqlora.json);
    default: what it was loaded with. tensors: {our key: tensor} when not the model's own (--fsdp gathers them
    from the ranks' shards)."""
    c, training = model.lora_config, training if training is not None else model.lora_config["training"]
    tensors = adapter_parameters(model) if tensors is None else tensors
    tensors = {k: p.detach().contiguous().cpu() for k, p in tensors.items()}
    lora = {peft_key(k): v.float() for k, v in tensors.items() if k.endswith(("lora_A", "lora_B"))}
    extra = {hf_key(k): v for k, v in tensors.items() if not k.endswith(("lora_A", "lora_B"))}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c["r"], "lora_alpha": c["alpha"],
              "lora_dropout": c["dropout"], "target_modules": sorted(c["targets"]), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path)}

    def write(tmp: Path):
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors(lora, tmp / ADAPTER_WEIGHTS)
        if extra:
            save_safetensors(extra, tmp / TRAINABLE_PARAMS)
        if training is not None:
            (tmp / TRAINING_INFO).write_text(json.dumps(training, indent=2) + "\n")

    return atomic.write_dir(out_dir, write)


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Load a PEFT LoRA adapter (ours, PEFT's or LongLoRA's) into `model`, adding LoRA with the file's r, alpha
    and dropout when the model has none yet. Everything is checked before the model is touched. The adapter's
    training record (longqlora.json, or None) ends up in model.lora_config["training"]."""
    adapter_dir = Path(adapter_dir)
    config, lora, extra, training = read_adapter(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    r, alpha, targets = config["r"], config["lora_alpha"], tuple(sorted(set(config["target_modules"])))
    current = getattr(model, "lora_config", None)
    if current is not None and (current["r"], set(current["targets"])) != (r, set(targets)):
        raise ValueError(f"{config_file}: adapter has r={r} and targets {list(targets)} but the model's LoRA has "
                         f"r={current['r']} and targets {sorted(current['targets'])}")
    modules = {n: m for n, m in model.named_modules()     # a LoRALinear wraps its base as `<name>.base_layer`
               if n.rsplit(".", 1)[-1] in targets and isinstance(m, (LoRALinear, nn.Linear, Linear4bit))}
    lacking = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n in modules})
    if lacking:
        raise ValueError(f"{config_file}: target modules {lacking} are not linear layers of this model")
    expected = {f"{name}.lora_{which}": shape for name, m in modules.items()
                for which, shape in (("A", (r, m.in_features)), ("B", (m.out_features, r)))}
    missing, unexpected = sorted(set(expected) - set(lora)), sorted(set(lora) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_file}: {len(unexpected)} tensor(s) for modules this model lacks or the config "
                         f"does not target, e.g. {peft_key(unexpected[0])}")
    if missing:
        raise ValueError(f"{weights_file}: {len(missing)} LoRA tensor(s) missing, e.g. {peft_key(missing[0])}")
    for key, shape in expected.items():
        if tuple(lora[key].shape) != shape:
            raise ValueError(f"{weights_file}: {peft_key(key)} has shape {tuple(lora[key].shape)}, the model "
                             f"needs {shape} (an adapter for a different model?)")
    params = dict(model.named_parameters())
    for key, t in extra.items():
        if not is_embed_or_norm(key) or key not in params or t.shape != params[key].shape:
            raise ValueError(f"{adapter_dir}: trainable parameter {hf_key(key)} {tuple(t.shape)} is not an "
                             "embedding or norm of this model")
    if current is None:
        add_lora(model, r=r, alpha=alpha, dropout=config.get("lora_dropout") or 0.0, targets=targets,
                 train_embed_norm=bool(extra))
        params = dict(model.named_parameters())
    model.lora_config.update(alpha=alpha, training=training)
    with torch.no_grad():
        for key, t in {**lora, **extra}.items():
            params[key].copy_(t)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.alpha, m.scaling = alpha, alpha / r
    return model


def read_adapter(adapter_dir):
    """(config, lora, extra, training) of an adapter folder written by us, PEFT or LongLoRA, all checked:
    lora {our key: tensor} of lora_A (r, in) / lora_B (out, r), extra {our key: tensor} of LoRA+ embeddings and
    norms ({} without), training the longqlora.json dict or None (an adapter trained elsewhere)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: adapter directory not found")
    config_file = adapter_dir / ADAPTER_CONFIG
    config = load_json(config_file, "missing (not a PEFT adapter directory?)")
    _check_lora_config(config, config_file)
    weights = _safetensors_or_bin(adapter_dir / ADAPTER_WEIGHTS)
    if weights is None:
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_WEIGHTS}: missing (nor is there adapter_model.bin)")
    lora = {}
    for key, t in read_tensor_file(weights).items():
        m = _PEFT_LORA_KEY.match(key)      # peft_key's inverse; PEFT may add the adapter name `.default`
        if m is None:
            raise ValueError(f"{weights}: unexpected tensor {key} (only LoRA A/B weights are supported)")
        ours = our_key(m["module"]) + "." + m["which"]
        rank = t.shape[0] if ours.endswith("lora_A") else t.shape[-1]
        if t.dim() != 2 or rank != config["r"]:
            raise ValueError(f"{weights}: {key} has shape {tuple(t.shape)}, i.e. rank {rank}, but {config_file} "
                             f"says r={config['r']}")
        lora[ours] = t
    if not lora:
        raise ValueError(f"{weights}: holds no LoRA weights")
    if isinstance(config["target_modules"], str):   # a PEFT regex: the tensors say which modules it matched
        config["target_modules"] = sorted({k.rsplit(".", 2)[-2] for k in lora})
    extra_file = _safetensors_or_bin(adapter_dir / TRAINABLE_PARAMS)
    extra = {} if extra_file is None else {
        our_key(k.removeprefix(PEFT_PREFIX)): t for k, t in read_tensor_file(extra_file).items()}
    for file, group, key in ((weights, lora, peft_key), (extra_file, extra, hf_key)):
        bad = next((k for k, t in group.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise ValueError(f"{file}: {key(bad)} holds NaN or inf values (saved from a diverged run?)")
    training = load_json(adapter_dir / TRAINING_INFO) if (adapter_dir / TRAINING_INFO).is_file() else None
    if training is not None:
        try:
            training["rope_scaling"] = normalize_rope_scaling(training.get("rope_scaling"))
        except ValueError as e:
            raise ValueError(f"{adapter_dir / TRAINING_INFO}: {e}") from None
    return config, lora, extra, training


def _safetensors_or_bin(file: Path) -> Path | None:
    return next((f for f in (file, file.with_suffix(".bin")) if f.is_file()), None)


def _check_lora_config(config: dict, config_file: Path) -> None:
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    dropout = config.get("lora_dropout") or 0.0
    problem = next((message for bad, message in (
        (config.get("peft_type") != "LORA", f"peft_type is {config.get('peft_type')!r}, only 'LORA' is supported"),
        (type(r) is not int or r <= 0, f"r must be a positive integer, got {r!r}"),
        (type(alpha) not in (int, float) or not math.isfinite(alpha), f"lora_alpha must be a finite number, got "
                                                                      f"{alpha!r}"),
        (type(dropout) not in (int, float) or not 0 <= dropout < 1, f"lora_dropout must be in [0, 1), got {dropout!r}"),
        (not (isinstance(targets, str) or isinstance(targets, list) and targets
              and all(type(t) is str for t in targets)), f"target_modules must be a list of module names, got {targets!r}"),
        *((bool(config.get(key)), f"{key}={config.get(key)!r} is not supported") for key in _UNSUPPORTED),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} is not supported (only 'none')"),
    ) if bad), None)
    if problem is not None:
        raise ValueError(f"{config_file}: {problem}")
