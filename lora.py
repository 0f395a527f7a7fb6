"""LoRA adapters: the trainable part of LongQLoRA, in PEFT's file format.

A frozen linear layer W (dense 16-bit, or NF4 via quant.Linear4bit) gets a low-rank update:

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zeros

so training starts exactly at the base model. A and B are fp32 whatever the base dtype (QLoRA keeps
the adapter in full precision; only the frozen base is 16-bit or 4-bit). LongQLoRA puts r=64,
alpha=16, dropout=0.05 on all seven decoder linears (q, k, v, o, gate, up, down); LongLoRA's "LoRA+"
also trains the embeddings and the norms (`train_embed_norm=True`).

Merging folds the update into the weight, W' = W + (alpha / r) * B @ A (computed in fp32, cast back
to W's dtype), so inference costs nothing extra. For an NF4-trained adapter the merge goes into the
original 16-bit weights of the base checkpoint (`merge_and_export`), never into the 4-bit copy.

Files are PEFT's: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`; our module `layers.{i}.self_attn.q_proj`
is that key minus `base_model.model.model.` and `.lora_A.weight`. LoRA+ embeddings and norms go beside
them in `trainable_params.safetensors` with HF checkpoint names (`model.embed_tokens.weight`), as LongLoRA
does (its `trainable_params.bin` is read too).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import Linear4bit

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"            # older PEFT versions
TRAINABLE_PARAMS = "trainable_params.safetensors"    # LoRA+ embeddings and norms
TRAINABLE_PARAMS_BIN = "trainable_params.bin"        # what LongLoRA writes

# PEFT wraps the HF model twice (PeftModel.base_model = LoraModel, LoraModel.model = LlamaForCausalLM),
# and the HF model keeps the decoder under `model.`.
PEFT_PREFIX = "base_model.model."
HF_PREFIX = "model."
# PEFT keys: `<module>.lora_A.weight`, or `<module>.lora_A.default.weight` from get_peft_model_state_dict
# variants that keep the adapter name.
_PEFT_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(\.default)?\.weight$")


# --------------------------------------------------------------------------- the layer

class LoRALinear(nn.Module):
    """base(x) + scaling * B(A(dropout(x))), the LoRA path in fp32 whatever the base computes in."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        # PEFT's initialisation (nn.Linear's default): uniform(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.train(base.training)   # a wrapped eval-mode model stays in eval mode (no dropout)

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        update = F.linear(F.linear(self.dropout(x.float()), self.lora_A), self.lora_B)
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shape (out, in)."""
        return (self.lora_B.detach() @ self.lora_A.detach()) * self.scaling

    def _dense_weight(self) -> torch.Tensor:
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError(f"cannot merge LoRA into a {type(self.base_layer).__name__}: only dense bases merge "
                             "in place; NF4-trained adapters are merged into the 16-bit originals by merge_and_export")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self):
        """W <- W + scaling * B @ A; the forward then skips the LoRA path."""
        w = self._dense_weight()
        if not self.merged:
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): W <- W - scaling * B @ A (exact in fp32, up to rounding in 16-bit)."""
        w = self._dense_weight()
        if self.merged:
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit))


def _is_embed_or_norm(param_name: str) -> bool:
    module = param_name.rsplit(".", 2)[-2] if "." in param_name else ""
    return module == "embed_tokens" or module.endswith("norm")


def add_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
             targets=DEFAULT_TARGETS, train_embed_norm: bool = False) -> list[nn.Parameter]:
    """Wrap every linear whose attribute name is in `targets` with LoRALinear and freeze everything else.

    Returns the trainable parameters: all lora_A/lora_B, plus the embeddings and every norm weight when
    `train_embed_norm` (LongLoRA's LoRA+). The configuration is kept as `model.lora_config` for save_adapter.
    """
    targets = tuple(dict.fromkeys(targets))
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA adapters")
    if "lm_head" in targets:
        raise ValueError("lm_head is never a LoRA target (LongQLoRA adapts the decoder linears only)")
    found = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and _is_adaptable(child):
                found.setdefault(name, []).append(f"{parent_name}.{name}".lstrip("."))
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no linear layer of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in (p for t in targets for p in found[t]):
        parent, leaf = _parent_of(model, path)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout))
    trainable = [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    if train_embed_norm:
        trainable += [p for n, p in model.named_parameters() if _is_embed_or_norm(n)]
    for p in trainable:
        p.requires_grad_(True)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets, train_embed_norm=train_embed_norm)
    return trainable


def _parent_of(model: nn.Module, path: str):
    *parents, leaf = path.split(".")
    module = model
    for p in parents:
        module = getattr(module, p)
    return module, leaf


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: {our key: tensor} for every lora_A / lora_B (`layers.0.self_attn.q_proj.lora_A`)
    and, with LoRA+, the embedding and norm weights (`embed_tokens.weight`, `norm.weight`, ...)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    return {n: p.detach() for n, p in model.named_parameters()
            if n.endswith((".lora_A", ".lora_B")) or (config["train_embed_norm"] and _is_embed_or_norm(n))}


# --------------------------------------------------------------------------- key names

def peft_key(key: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return PEFT_PREFIX + HF_PREFIX + key + ".weight"


def lora_key_from_peft(key: str) -> str | None:
    """Inverse of peft_key, accepting PEFT's optional `.default` adapter name; None for a non-LoRA key."""
    m = _PEFT_LORA_KEY.match(key)
    if m is None or not key.startswith(PEFT_PREFIX):
        return None
    module = m["module"][len(PEFT_PREFIX):]
    return module.removeprefix(HF_PREFIX) + "." + m["which"]


def hf_param_key(key: str) -> str:
    """Our key of an embedding/norm weight -> the HF checkpoint key (`norm.weight` -> `model.norm.weight`)."""
    return HF_PREFIX + key


def param_key_from_hf(key: str) -> str:
    """HF (or LongLoRA's PEFT-prefixed) key of a trainable embedding/norm -> our key."""
    return key.removeprefix(PEFT_PREFIX).removeprefix(HF_PREFIX)


# --------------------------------------------------------------------------- saving

def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None) -> Path:
    """Write `out_dir` in PEFT's format (loads with `PeftModel.from_pretrained`), atomically."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    state = adapter_state_dict(model)
    lora = {peft_key(k): v.float().contiguous().cpu() for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    extra = {hf_param_key(k): v.contiguous().cpu() for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": config["r"],
        "lora_alpha": config["alpha"],
        "lora_dropout": config["dropout"],
        "target_modules": sorted(config["targets"]),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }

    def write(tmp: Path):
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(lora, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / TRAINABLE_PARAMS), metadata={"format": "pt"})

    return write_dir_atomically(out_dir, write)


def write_dir_atomically(out_dir, write) -> Path:
    """Call write(tmp) on a fresh folder beside `out_dir`, then put it in place of `out_dir`; an existing
    `out_dir` is replaced only once the new one is complete, and a failed write leaves it untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------- reading

def read_adapter(adapter_dir) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], Path]:
    """Read and check an adapter directory written by us, PEFT or LongLoRA.

    Returns (config, lora, extra, weights_file): lora maps our keys (`layers.0.self_attn.q_proj.lora_A`) to
    tensors, extra maps our keys of LoRA+ embeddings/norms to tensors (empty without them).
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: adapter directory not found")
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (not a PEFT adapter directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: malformed JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    _check_lora_config(config, config_file)

    weights_file = next((adapter_dir / f for f in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)
                         if (adapter_dir / f).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_WEIGHTS}: missing (nor is there {ADAPTER_WEIGHTS_BIN})")
    lora = {}
    for key, tensor in _read_tensor_file(weights_file).items():
        ours = lora_key_from_peft(key)
        if ours is None:
            raise ValueError(f"{weights_file}: unexpected tensor {key} (only LoRA A/B weights are supported)")
        lora[ours] = tensor
    if not lora:
        raise ValueError(f"{weights_file}: holds no LoRA weights")
    r = config["r"]
    for key, t in lora.items():
        rank = t.shape[0] if key.endswith("lora_A") else t.shape[-1]
        if t.dim() != 2 or rank != r:
            raise ValueError(f"{weights_file}: {peft_key(key)} has shape {tuple(t.shape)}, i.e. rank {rank}, "
                             f"but {config_file} says r={r}")

    extra = {}
    extra_file = next((adapter_dir / f for f in (TRAINABLE_PARAMS, TRAINABLE_PARAMS_BIN)
                       if (adapter_dir / f).is_file()), None)
    if extra_file is not None:
        for key, tensor in _read_tensor_file(extra_file).items():
            ours = param_key_from_hf(key)
            if not _is_embed_or_norm(ours):
                raise ValueError(f"{extra_file}: unexpected tensor {key} (only embeddings and norms are expected)")
            extra[ours] = tensor
    return config, lora, extra, weights_file


def _check_lora_config(config: dict, config_file: Path):
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{config_file}: r must be a positive integer, got {r!r}")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise ValueError(f"{config_file}: lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    # PEFT options that change the computation; refusing beats silently computing something else.
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{config_file}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: bias={config['bias']!r} is not supported (only 'none')")


def _read_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise their own types for truncated or foreign files
        raise ValueError(f"{file}: cannot read tensors, truncated or corrupt? ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return state


def _target_names(config: dict, lora: dict, config_file: Path) -> tuple[str, ...]:
    """target_modules as attribute names. PEFT also allows a regex string; then the tensors say which."""
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        return tuple(sorted(set(targets)))
    if isinstance(targets, str):
        return tuple(sorted({k.rsplit(".", 2)[-2] for k in lora}))
    raise ValueError(f"{config_file}: target_modules must be a list of module names, got {targets!r}")


# --------------------------------------------------------------------------- loading into our model

def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model`, adding LoRA with the file's r/alpha/dropout
    when the model has none yet. Everything is checked before the model is touched."""
    adapter_dir = Path(adapter_dir)
    config, lora, extra, weights_file = read_adapter(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    r, alpha = config["r"], config["lora_alpha"]
    targets = _target_names(config, lora, config_file)

    current = getattr(model, "lora_config", None)
    if current is not None:
        if current["r"] != r:
            raise ValueError(f"{config_file}: adapter has r={r} but the model's LoRA has r={current['r']}")
        if set(current["targets"]) != set(targets):
            raise ValueError(f"{config_file}: adapter targets {list(targets)} but the model's LoRA targets "
                             f"{sorted(current['targets'])}")
        modules = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        if any(m.merged for m in modules.values()):
            raise ValueError(f"{adapter_dir}: unmerge the model's LoRA before loading another adapter")
    else:
        modules = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and _is_adaptable(m)}
        lacking = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n in modules})
        if lacking:
            raise ValueError(f"{config_file}: target modules {lacking} are not linear layers of this model")

    expected = {}
    for name, m in modules.items():
        expected[name + ".lora_A"] = (r, m.in_features)
        expected[name + ".lora_B"] = (m.out_features, r)
    missing, unexpected = sorted(set(expected) - set(lora)), sorted(set(lora) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_file}: {len(unexpected)} tensor(s) for modules this model lacks or the config "
                         f"does not target, e.g. {peft_key(unexpected[0])}")
    if missing:
        raise ValueError(f"{weights_file}: {len(missing)} LoRA tensor(s) missing, e.g. {peft_key(missing[0])}")
    for key, shape in expected.items():
        if tuple(lora[key].shape) != shape:
            raise ValueError(f"{weights_file}: {peft_key(key)} has shape {tuple(lora[key].shape)}, the model needs "
                             f"{shape} (an adapter for a different model?)")
    params = dict(model.named_parameters())
    for key, t in extra.items():
        if key not in params:
            raise ValueError(f"{adapter_dir}: trainable parameter {hf_param_key(key)} does not exist in the model")
        if tuple(t.shape) != tuple(params[key].shape):
            raise ValueError(f"{adapter_dir}: {hf_param_key(key)} has shape {tuple(t.shape)}, the model needs "
                             f"{tuple(params[key].shape)}")

    if current is None:
        add_lora(model, r=r, alpha=alpha, dropout=config.get("lora_dropout") or 0.0, targets=targets,
                 train_embed_norm=bool(extra))
        params = dict(model.named_parameters())
    model.lora_config["alpha"] = alpha
    with torch.no_grad():
        for key, t in {**lora, **extra}.items():
            params[key].copy_(t)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.alpha, m.scaling = alpha, alpha / r
    return model


# --------------------------------------------------------------------------- merging

def merged_weight(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    if (lora_b.shape[0], lora_a.shape[1]) != tuple(w.shape) or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"LoRA A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a weight of shape "
                         f"{tuple(w.shape)}")
    return (w.float() + scaling * (lora_b.float() @ lora_a.float())).to(w.dtype)


def merge_lora_weights(base_state_dict: dict, adapter_state_dict: dict, scaling: float) -> dict:
    """Pure merge. base_state_dict: HF keys (`model.layers.0.self_attn.q_proj.weight`); adapter_state_dict:
    PEFT keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). Returns a new dict with
    the targeted weights merged and every other tensor as it was."""
    pairs = _lora_pairs({lora_key_from_peft(k) or k: v for k, v in adapter_state_dict.items()})
    merged = dict(base_state_dict)
    for module, (a, b) in pairs.items():
        key = HF_PREFIX + module + ".weight"
        if key not in merged:
            raise ValueError(f"adapter targets {key}, which the base state dict lacks")
        merged[key] = merged_weight(merged[key], a, b, scaling)
    return merged


def _lora_pairs(lora: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our key: tensor} of lora_A/lora_B -> {module path: (A, B)}."""
    pairs = {}
    for key in lora:
        module, which = key.rsplit(".", 1)
        if which not in ("lora_A", "lora_B"):
            raise ValueError(f"unexpected adapter tensor {key}")
        if which == "lora_A":
            if module + ".lora_B" not in lora:
                raise ValueError(f"adapter has {key} but no matching lora_B")
            pairs[module] = (lora[key], lora[module + ".lora_B"])
        elif module + ".lora_A" not in lora:
            raise ValueError(f"adapter has {key} but no matching lora_A")
    return pairs


def hf_rope_scaling(scaling: dict) -> dict:
    """What HF config.json gets for a normalised scaling dict. Linear/dynamic use the legacy
    {"type", "factor"} pair that transformers 4.31 through 5.x all read; other types need "rope_type"."""
    rope_type = scaling["rope_type"]
    params = {k: v for k, v in scaling.items() if k != "rope_type"}
    if rope_type in ("linear", "dynamic") and set(params) == {"factor"}:
        return {"type": rope_type, "factor": params["factor"]}
    return {"rope_type": rope_type, **params}


def export_config(base_config: dict, rope_scaling: dict | None, source) -> dict:
    """The base config.json with the RoPE scaling written in (unchanged when rope_scaling is None)."""
    from rope import normalize_rope_scaling

    cfg = dict(base_config)
    if cfg.get("quantization_config"):
        raise ValueError(f"{source}: the base is quantised; merge_and_export needs the original 16-bit weights")
    if rope_scaling is None:
        return cfg
    scaling = normalize_rope_scaling(rope_scaling)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    # transformers 5 folds rope_theta into rope_parameters; we write the portable top-level form instead.
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = None if scaling is None else hf_rope_scaling(scaling)
    return cfg


def merge_and_export(base_dir, adapter_dir, out_dir, rope_scaling: dict | None = None,
                     max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Merge an adapter into the 16-bit weights of `base_dir` and write a full HF checkpoint to `out_dir`.

    Tensors are read, merged and written one at a time (peak memory: one shard plus one tensor). LoRA+
    embeddings/norms replace the base tensors. rope_scaling (e.g. {"type": "linear", "factor": 2.0}) is
    written into config.json so that HF loads the model with the context it was trained for.
    """
    # model.py owns checkpoint reading/writing; imported here so LoRA on plain modules needs only torch.
    from model import checkpoint_files, load_config, read_tensors, save_hf_checkpoint

    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    config, lora, extra, weights_file = read_adapter(adapter_dir)
    scaling = config["lora_alpha"] / config["r"]
    out_config = export_config(load_config(base_dir), rope_scaling, base_dir / "config.json")
    files = checkpoint_files(base_dir)
    pairs = {HF_PREFIX + module + ".weight": ab for module, ab in _lora_pairs(lora).items()}
    replaced = {hf_param_key(k): v for k, v in extra.items()}
    for key in [*pairs, *replaced]:
        if key not in files:
            raise ValueError(f"{adapter_dir}: adapter has weights for {key}, which {base_dir} lacks")

    def tensors():
        for name, t, file in read_tensors(files):
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name in replaced:
                if replaced[name].shape != t.shape:
                    raise ValueError(f"{adapter_dir}: {name} has shape {tuple(replaced[name].shape)}, "
                                     f"{file} has {tuple(t.shape)}")
                t = replaced[name].to(t.dtype)
            if name in pairs:
                try:
                    t = merged_weight(t, *pairs[name], scaling)
                except ValueError as e:
                    raise ValueError(f"{weights_file}: {name}: {e} (an adapter for a different model?)") from None
            yield name, t

    return save_hf_checkpoint(tensors(), out_config, out_dir, max_shard_bytes, copy_from=base_dir)
