"""The LLaMA decoder, top to bottom, and loading of real HF checkpoints.

LongQLoRA changes nothing in the architecture; it changes how positions are encoded (Position
Interpolation, rope.py), how attention is computed during training (S²-Attn, attention.py) and how the
frozen weights are stored (NF4, quant.py). So this file is a plain LLaMA-2 / LLaMA-3 / GQA decoder:

    h_0 = E[tokens]
    a_l = h_{l-1} + W_o · Attn(RoPE(W_q · n), RoPE(W_k · n), W_v · n)      n = RMSNorm(h_{l-1})
    h_l = a_l + W_down · (silu(W_gate · m) * (W_up · m))                   m = RMSNorm(a_l)
    logits = W_head · RMSNorm(h_L)

with RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in fp32 as HF does.

Module names mirror the HF checkpoint minus its leading "model." so that a state-dict key maps to
a checkpoint key by one rule (`hf_key` / `our_key`) and PEFT adapter keys line up too.

`Transformer.from_pretrained` builds the module on the `meta` device and materialises it tensor by
tensor straight from the (memory-mapped) safetensors shards, quantising the decoder linears to NF4
as they are read when asked, so a 7B model never sits in RAM twice (or at all in 16-bit, with NF4).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import causal_attention, s2_attention
from rope import apply_rope, normalize_rope_scaling, rope_cos_sin, rope_inv_freq

# The seven decoder linears: the ones QLoRA quantises and LoRA adapts.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DECODER_LINEAR_KEY = re.compile(r"^layers\.\d+\.(self_attn|mlp)\.(%s)\.weight$" % "|".join(DECODER_LINEARS))
# Tensors some older checkpoints carry that are recomputed here, never loaded.
_IGNORED_KEY = re.compile(r"rotary_emb\.inv_freq$")
# bitsandbytes' serialised NF4 statistics that sit beside a pre-quantised `*.weight`.
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


# --------------------------------------------------------------------------- configuration

@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None       # < n_heads: grouped-query attention (LLaMA-2-70B, LLaMA-3, Mistral)
    head_dim: int | None = None         # defaults to dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None    # normalised by rope.normalize_rope_scaling; None = plain RoPE
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    extra: dict = field(default_factory=dict, repr=False)  # untouched config keys, written back on export

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str | os.PathLike = "config.json") -> "ModelArgs":
        """Read an HF LLaMA `config.json` dict; unsupported or incomplete configs fail naming `source`."""
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: unsupported model_type {model_type!r} (only 'llama' is implemented)")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if cfg.get(key, ok) != ok:
                raise ValueError(f"{source}: unsupported {key}={cfg[key]!r} (LLaMA uses {ok!r})")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
        if missing:
            raise ValueError(f"{source}: missing or invalid {', '.join(missing)}")
        # transformers 5 moved rope_theta (and the scaling) into `rope_parameters`.
        rope_params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or rope_params or None
        if scaling and "original_max_position_embeddings" in cfg:
            # HF lets a top-level original_max_position_embeddings win over the one inside the scaling dict.
            scaling = {**scaling, "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
        known = set(required) | {"num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                                 "max_position_embeddings", "tie_word_embeddings", "rope_scaling",
                                 "rope_parameters", "bos_token_id", "eos_token_id"}
        try:
            return cls(
                vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False), rope_scaling=scaling,
                bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2),
                extra={k: v for k, v in cfg.items() if k not in known},
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict:
        """The config.json HF transformers (4.x and 5.x) reads back into the same model."""
        cfg = dict(self.extra)
        cfg.update(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=self.vocab_size,
            hidden_size=self.dim, intermediate_size=self.intermediate_size, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, attention_bias=False, mlp_bias=False,
            rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
        )
        cfg.pop("rope_parameters", None)
        cfg.pop("quantization_config", None)  # exports are dense
        return cfg


def load_config(path: str | os.PathLike) -> dict:
    """`config.json` of a model directory as a dict; a missing or malformed file names itself."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (is {Path(path)} an HF model directory?)")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return cfg


def hf_key(key: str) -> str:
    """Our state-dict key -> the HF checkpoint key."""
    return key if key.startswith("lm_head.") else "model." + key


def our_key(key: str) -> str:
    """HF checkpoint key -> our state-dict key."""
    return key[len("model."):] if key.startswith("model.") else key


# --------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics even for 16-bit activations: the mean of squares over 4096 values overflows fp16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, attend, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attend(q, k, v)                                   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, attend, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len` positions."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0     # positions already stored; advanced by Transformer.forward after all layers

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions, asked for {end}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        if self.embed_tokens.weight.device.type != "meta":   # from_pretrained builds on meta: nothing to init
            self.init_weights()

    def init_weights(self, std: float = 0.02):
        """HF LLaMA's initialisation (normal(0, 0.02) weights, unit norms), for models trained from scratch."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def rope_tables(self, positions, dtype):
        """cos/sin for `positions`; dynamic NTK depends on the longest position seen, so this is per call."""
        a = self.args
        inv_freq, attention_factor = rope_inv_freq(
            a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings, seq_len=int(positions[-1]) + 1)
        return rope_cos_sin(inv_freq.to(positions.device), positions, attention_factor, dtype)

    def forward(self, tokens, *, cache: KVCache | None = None, attn: str = "full", group_size_ratio: float = 0.25,
                s2_shift: str = "segment", padding_mask=None, return_hidden: bool = False):
        """tokens (B, T) -> logits (B, T, V), or the final-norm hidden states (B, T, dim) if `return_hidden`.

        attn="full": causal attention over everything (inference, eval). attn="s2": S²-Attn with groups of
        int(T * group_size_ratio) tokens (training only). padding_mask (B, T) is True on real tokens.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        h = self.embed_tokens(tokens)
        cos, sin = self.rope_tables(positions, h.dtype)
        attend = self._attention(attn, T, group_size_ratio, s2_shift, padding_mask, cache)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its inside in backward. LoRA dropout stays
                # identical in the recompute because checkpoint() restores the RNG state.
                h = checkpoint(layer, h, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attend, cache)
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    @staticmethod
    def _attention(attn, T, group_size_ratio, s2_shift, padding_mask, cache):
        if attn == "full":
            if padding_mask is not None and cache is not None:
                raise ValueError("a padding mask with a KV cache is not supported")
            return lambda q, k, v: causal_attention(q, k, v, key_padding_mask=padding_mask)
        if attn == "s2":
            if cache is not None:
                raise ValueError("S²-Attn is a training-time approximation; decode with attn='full'")
            group_size = max(1, int(T * group_size_ratio))
            return lambda q, k, v: s2_attention(q, k, v, group_size=group_size, shift=s2_shift,
                                                key_padding_mask=padding_mask)
        raise ValueError(f"attn must be 'full' or 's2', got {attn!r}")

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.bfloat16, device="cpu", rope_scaling=None, quantize=None,
                        quant_backend="auto") -> "Transformer":
        """Load an HF LLaMA directory. rope_scaling (e.g. {"type": "linear", "factor": 2.0}) overrides the
        config: Position Interpolation applied at load time. quantize="nf4" stores the seven decoder
        linears of every layer in NF4 (quant.Linear4bit), quantised as each tensor is read."""
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        path = Path(path)
        args = ModelArgs.from_hf_config(load_config(path), source=path / "config.json")
        if rope_scaling is not None:
            args.rope_scaling = normalize_rope_scaling(rope_scaling)
        with torch.device("meta"):
            model = cls(args)
        _load_weights(model, path, dtype, torch.device(device), quantize, quant_backend)
        return model.eval()


# --------------------------------------------------------------------------- checkpoint loading

def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it, from the safetensors index, a single safetensors file, or .bin files."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index ({e!r})") from None
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard named by {index} is missing")
        return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return {name: path / single for name in _tensor_names(path / single)}
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard named by {index} is missing")
        return files
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")


def _tensor_names(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        return list(safetensors_header(file)[0])
    return list(_load_bin(file).keys())


# safetensors layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw tensor bytes. Reading each tensor with plain read() into its own buffer (rather than through
# a memory map) keeps file pages out of this process's RSS, so loading costs one model's worth of memory.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(file: Path) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, byte offset of the data), checked against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{file}: cannot read safetensors header, truncated or corrupt? ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: cannot read safetensors header, truncated or corrupt? ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise ValueError(f"{file}: cannot read tensor {name}: it ends at byte {end} but the file has {size} "
                             f"bytes, truncated or corrupt?")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
    return header, 8 + n


def _read_safetensor(f, info: dict, data_start: int) -> torch.Tensor:
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    f.readinto(memoryview(buf.numpy()))
    return buf.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _load_bin(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot read PyTorch checkpoint, truncated or corrupt? ({e})") from None


def read_tensors(files: dict[str, Path]):
    """Yield (name, tensor, file), one tensor at a time, file by file."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if file.suffix == ".safetensors":
            header, data_start = safetensors_header(file)
            with open(file, "rb") as f:
                for name in names:
                    if name not in header:
                        raise ValueError(f"{file}: tensor {name} named by the index is not in this shard")
                    yield name, _read_safetensor(f, header[name], data_start), file
        else:
            state = _load_bin(file)
            for name in names:
                if name not in state:
                    raise ValueError(f"{file}: tensor {name} named by the index is not in this file")
                yield name, state[name], file
            del state


def _load_weights(model: Transformer, path: Path, dtype, device, quantize, quant_backend):
    files = checkpoint_files(path)
    expected = dict(model.state_dict(keep_vars=True))
    if model.args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    prequantized = {n[: -len(".absmax")] for n in files if n.endswith(".weight.absmax")}
    pending_stats: dict[str, dict] = {}       # bnb statistics of pre-quantised weights, gathered per weight
    loaded = set()
    for name, tensor, file in read_tensors(files):
        if _IGNORED_KEY.search(name):
            continue
        base = next((name[: -len(s)] for s in _BNB_SUFFIXES if name.endswith(s)), None)
        if base is not None and base in prequantized:
            pending_stats.setdefault(base, {})[name] = tensor
            continue
        key = our_key(name)
        if key == "lm_head.weight" and model.args.tie_word_embeddings:
            continue                           # some tied checkpoints store the shared matrix twice
        if key not in expected:
            raise ValueError(f"{file}: unexpected tensor {name} (not part of a {model.args.n_layers}-layer LLaMA)")
        if name in prequantized:
            pending_stats.setdefault(name, {})[name] = tensor
            loaded.add(key)
            continue
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected {want}")
        tensor = tensor.to(device=device, dtype=dtype)
        if quantize == "nf4" and _DECODER_LINEAR_KEY.match(key):
            from quant import Linear4bit
            _set_module(model, key, Linear4bit.from_weight(tensor, compute_dtype=dtype, backend=quant_backend))
        else:
            _set_parameter(model, key, tensor)
        loaded.add(key)
        del tensor
    for name, stats in pending_stats.items():
        _load_prequantized(model, name, stats, files[name], dtype, device, quantize, quant_backend, expected)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(hf_key(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {shown}")
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _load_prequantized(model, name, stats, file, dtype, device, quantize, quant_backend, expected):
    """A weight saved by bitsandbytes in NF4 (a `*-bnb-4bit` directory): keep it in NF4, or dequantise."""
    from quant import Linear4bit, dequantize_nf4, state_from_tensors

    key = our_key(name)
    if not _DECODER_LINEAR_KEY.match(key):
        raise ValueError(f"{file}: {name} is NF4-quantised but only decoder linears can be")
    packed = stats.pop(name)
    try:
        state = state_from_tensors(stats, prefix=name[: -len("weight")], packed=packed)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    want = tuple(expected[key].shape)
    if tuple(state.shape) != want:
        raise ValueError(f"{file}: tensor {name} is quantised with shape {tuple(state.shape)}, expected {want}")
    if quantize == "nf4":
        layer = Linear4bit(packed, state, compute_dtype=dtype, backend=quant_backend).to(device)
        _set_module(model, key, layer)
    else:
        _set_parameter(model, key, dequantize_nf4(packed, state, dtype).to(device))


def _parent(model: nn.Module, key: str):
    *path, leaf = key.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
    return module, leaf


def _set_parameter(model, key, tensor):
    module, leaf = _parent(model, key)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def _set_module(model, weight_key, new_module):
    """Replace the module owning `weight_key` (an nn.Linear) by `new_module`."""
    parent, leaf = _parent(model, weight_key[: -len(".weight")])
    setattr(parent, leaf, new_module)


# --------------------------------------------------------------------------- saving

def save_hf_checkpoint(tensors, config: dict, out_dir, max_shard_bytes: int = 2 * 1024**3, copy_from=None):
    """Write an HF model directory atomically: config.json, safetensors shards (+ index when more than one)
    and the tokenizer files of `copy_from`. `tensors` yields (hf_name, tensor), so a caller can stream one
    merged tensor at a time; a shard is written as soon as it is full. The folder is built beside
    `out_dir` and renamed into place only when complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shard_names, weight_map, current, size = [], {}, {}, 0

        def flush():
            name = f"shard-{len(shard_names)}.safetensors"
            save_file(current, str(tmp / name), metadata={"format": "pt"})
            shard_names.append(name)
            weight_map.update({k: name for k in current})

        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[name] = t.detach().contiguous().cpu()
            size += nbytes
        if current:
            flush()
        n = len(shard_names)
        final = {s: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, s in enumerate(shard_names)}
        for s, f in final.items():
            os.replace(tmp / s, tmp / f)
        if n > 1:
            total = sum((tmp / f).stat().st_size for f in final.values())
            index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if copy_from is not None:
            for f in Path(copy_from).iterdir():
                if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
                    shutil.copy2(f, tmp / f.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_pretrained(model: Transformer, out_dir, max_shard_bytes: int = 2 * 1024**3, copy_from=None):
    """Save a dense model as an HF LLaMA directory that transformers loads (used for models trained here)."""
    state = model.state_dict()
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return save_hf_checkpoint(((hf_key(k), v) for k, v in state.items()), model.args.to_hf_config(),
                              out_dir, max_shard_bytes, copy_from)


# --------------------------------------------------------------------------- loss

class _ChunkedCE(torch.autograd.Function):
    """Cross-entropy of h @ W^T, chunk by chunk of tokens, without ever keeping the (N, V) logits.

    d(nll)/d(logits) = softmax(logits) - onehot(target), so d(nll)/dh = (softmax - onehot) @ W.
    - Frozen head (LoRA, the usual case): that (N, dim) gradient is computed in the forward pass, while
      each chunk's logits exist anyway, and saved; backward only scales it. No logits are recomputed.
    - Trained head (full fine-tuning): forward saves the log-sum-exp per token; backward recomputes each
      chunk's logits to get both dh and dW.
    - No gradient wanted (evaluation): only the nll.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        n = h.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        valid = targets != -100
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dnll_dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if want_h and not want_w else None
        lse = torch.empty_like(nll) if want_w else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (h[s:e] @ weight.t()).float()
            t = targets[s:e].clamp(min=0)
            # cross_entropy's fused kernel beats a separate logsumexp; lse = nll + the target's logit.
            chunk_nll = F.cross_entropy(logits, t, reduction="none")
            chunk_lse = chunk_nll + logits.gather(1, t[:, None]).squeeze(1)
            nll[s:e] = chunk_nll * valid[s:e]
            if lse is not None:
                lse[s:e] = chunk_lse
            if dnll_dh is not None:
                dnll_dh[s:e] = _dlogits_times_head(logits, chunk_lse, t, valid[s:e], weight)
            del logits
        ctx.chunk_size, ctx.h_dtype = chunk_size, h.dtype
        if want_w:
            ctx.save_for_backward(h, weight, targets, lse)
        else:
            ctx.save_for_backward(dnll_dh)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        if not ctx.needs_input_grad[1]:
            (dnll_dh,) = ctx.saved_tensors
            return (dnll_dh * grad_nll[:, None]).to(ctx.h_dtype), None, None, None
        h, weight, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        valid = targets != -100
        for s in range(0, h.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, h.shape[0])
            t = targets[s:e].clamp(min=0)
            probs = _softmax_minus_onehot((h[s:e] @ weight.t()).float(), lse[s:e], t, valid[s:e])
            probs.mul_(grad_nll[s:e, None])
            if grad_h is not None:
                grad_h[s:e] = (probs.to(weight.dtype) @ weight).to(h.dtype)
            grad_w += probs.t() @ h[s:e].float()
            del probs
        return grad_h, grad_w.to(weight.dtype), None, None


def _softmax_minus_onehot(logits, lse, targets, valid):
    """d(nll)/d(logits) in place over `logits` (rows of ignored tokens are zero)."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, targets[:, None], -torch.ones_like(probs[:, :1]))
    return probs.mul_(valid[:, None])


# A power of two applied before the 16-bit matmul and removed after it: softmax values near 1/V (~3e-5) would
# otherwise land in fp16's subnormal range and lose precision. Exact for every dtype.
_DLOGITS_SCALE = 1024.0


def _dlogits_times_head(logits, lse, targets, valid, weight):
    """(softmax - onehot) @ W for one chunk, in fp32, consuming `logits`."""
    probs = _softmax_minus_onehot(logits, lse, targets, valid).mul_(_DLOGITS_SCALE)
    return (probs.to(weight.dtype) @ weight).float().div_(_DLOGITS_SCALE)


def chunked_cross_entropy(hidden, head_weight, labels, chunk_size: int = 1024, reduction: str = "mean"):
    """Next-token cross-entropy of `hidden @ head_weight.T` in chunks of tokens.

    hidden (B, T, dim) are final-norm hidden states, labels (B, T) are aligned with the input ids (position t
    predicts labels[:, t + 1]; -100 is ignored). reduction "mean" (over counted tokens), "sum", or "none"
    (per-token nll of shape (B, T - 1), 0 where ignored). At no point do (B*T, V) fp32 logits exist.
    """
    B, T, D = hidden.shape
    h = hidden[:, :-1].reshape(-1, D)
    targets = labels[:, 1:].reshape(-1)
    nll = _ChunkedCE.apply(h, head_weight, targets, chunk_size)
    if reduction == "none":
        return nll.view(B, T - 1)
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / (targets != -100).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
