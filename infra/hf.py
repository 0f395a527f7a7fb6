"""The file formats users already have (REFERENCE §5). None of this is the method; it lets the method run on
real checkpoints:

  config.json              <-> ModelArgs     read_config, config_json (every field type- and range-checked)
  *.safetensors, *.bin     ->  tensors       read_tensors, one at a time (safetensors through the safetensors
                                             library, which checks the header against the file first)
  *.index.json             ->  which file holds which tensor: checkpoint_files (shards must lie in the folder)
  HF keys                  <-> our names     model.<our name>, except lm_head.weight (hf_key, our_key)
  *-bnb-4bit checkpoints   ->  Linear4bit    bitsandbytes' serialised NF4 state, read by infra/bnb.py
  HF model folders         <-  tensors       save_checkpoint (sharded, atomic), save_model

load_model checks the checkpoint's names and shapes (headers only) against config.json, builds the Transformer on
the `meta` device and fills it tensor by tensor (each copied into its own memory, so file pages do not pile up in
RSS), quantising the seven decoder linears to NF4 as they are read when asked: a 7B model never sits in memory
twice, nor at all in 16-bit with NF4. NaN or inf in a base weight is an error naming the tensor.
"""
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from infra import atomic
from infra.bnb import nf4_state_from_tensors
from infra.rope_scaling import hf_rope_scaling, normalize_rope_scaling, rope_inv_freq
from model import DECODER_LINEARS, ModelArgs, Transformer
from quant import NESTED_BLOCKSIZE, Linear4bit, NF4State, dequantize_nf4

# --------------------------------------------------------------------------- config.json

def load_json(file: Path, missing: str = "not found") -> dict:
    """A JSON object from `file`; a missing, unreadable or non-object file is one error naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: {missing}")
    try:
        obj = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def config_file(path) -> Path:
    """The config.json of a model folder, or `path` itself when it names the file."""
    path = Path(path)
    return path / "config.json" if path.is_dir() or not path.suffix else path


def load_config(path) -> dict:
    return load_json(config_file(path), f"no config.json (is {path} an HF model directory?)")


def read_config(path) -> ModelArgs:
    """ModelArgs of an HF LLaMA folder; an unsupported, missing or out-of-range field is one error naming
    config.json and the field."""
    cfg = load_config(path)
    try:
        return config_to_args(cfg)
    except ValueError as e:
        raise ValueError(f"{config_file(path)}: {e}") from None


def _get(cfg: dict, key: str, kind: str, default=None):
    """cfg[key] checked to be of `kind`: "int" (> 0), "float" (finite, > 0), "bool", "dict"; None if absent."""
    value = cfg.get(key, default)
    ok, want = {"int": (type(value) is int and value > 0, "a positive integer"),
                "float": (type(value) in (int, float) and math.isfinite(value) and value > 0,
                          "a finite positive number"),
                "bool": (type(value) is bool, "true or false"),
                "dict": (isinstance(value, dict), "a JSON object")}[kind]
    if value is not None and not ok:
        raise ValueError(f"{key} must be {want}, got {value!r}")
    return value


def config_to_args(cfg: dict) -> ModelArgs:
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"unsupported model_type {cfg['model_type']!r} (only 'llama' is implemented)")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"unsupported {key}={cfg[key]!r} (LLaMA uses {ok!r})")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    ints = {k: _get(cfg, k, "int") for k in (*required, "num_key_value_heads", "head_dim")}
    # transformers 5 moved rope_theta (and the scaling) into `rope_parameters`
    rope_params = _get(cfg, "rope_parameters", "dict") or {}
    scaling = _get(cfg, "rope_scaling", "dict") or {k: v for k, v in rope_params.items() if k != "rope_theta"} or None
    if scaling and "original_max_position_embeddings" in cfg:
        # HF lets a top-level original_max_position_embeddings win over the one inside the scaling dict
        scaling = {**scaling, "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
    theta = _get(rope_params, "rope_theta", "float"), _get(cfg, "rope_theta", "float", 10000.0)   # both checked
    known = set(ints) | {"rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                         "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id"}
    return ModelArgs(
        vocab_size=ints["vocab_size"], dim=ints["hidden_size"], intermediate_size=ints["intermediate_size"],
        n_layers=ints["num_hidden_layers"], n_heads=ints["num_attention_heads"],
        n_kv_heads=ints["num_key_value_heads"], head_dim=ints["head_dim"],
        norm_eps=_get(cfg, "rms_norm_eps", "float", 1e-6), rope_theta=theta[0] or theta[1],
        max_position_embeddings=_get(cfg, "max_position_embeddings", "int", 4096),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", "bool", False),
        rope_scaling=normalize_rope_scaling(scaling), rope_rule=rope_inv_freq,
        bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2),
        extra={k: v for k, v in cfg.items() if k not in known})


def config_json(args: ModelArgs) -> dict:
    """The config.json HF transformers (4.x and 5.x) reads back into the same model."""
    cfg = {k: v for k, v in args.extra.items() if k not in ("rope_parameters", "quantization_config")}  # dense
    cfg.update(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=args.vocab_size,
        hidden_size=args.dim, intermediate_size=args.intermediate_size, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id, attention_bias=False, mlp_bias=False,
        rope_scaling=hf_rope_scaling(args.rope_scaling))
    return cfg


def hf_key(key: str) -> str:
    """Our state-dict key -> the HF checkpoint key."""
    return key if key.startswith("lm_head.") else "model." + key


def our_key(key: str) -> str:
    return key.removeprefix("model.")


# --------------------------------------------------------------------------- reading tensors

def _safe_open(file: Path):
    """The safetensors library's reader of `file`. It checks the header against the file before anything is read:
    known dtypes, and offsets of exactly shape x itemsize bytes that tile the data with no overlap, gap or overrun
    (so a name given twice cannot point at other bytes either). A damaged file is one error naming it."""
    try:
        return safetensors.safe_open(file, "pt")
    except safetensors.SafetensorError as e:
        raise ValueError(f"{file}: cannot read safetensors header, truncated or corrupt? ({e})") from None


def _load_bin(file: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)  # weights_only: no pickle code
    except pickle.UnpicklingError as e:  # torch's refusal, whose advice (weights_only=False) runs the file's code
        why = re.search(r"WeightsUnpickler error: (.*?)(\.(\s|$)|$)", str(e), re.M)
        raise ValueError(f"{file}: refused: it pickles Python objects besides tensors ({why[1] if why else e}), "
                         "and nothing but tensors is ever unpickled here; convert it to safetensors") from None
    except Exception as e:  # zip / pickle errors of a damaged file come in many types
        raise ValueError(f"{file}: cannot read PyTorch checkpoint, truncated or corrupt? ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return state


def tensor_shapes(file: Path) -> dict[str, tuple]:
    """{name: shape} of the tensors of a .safetensors file (its header alone) or a .bin file."""
    if file.suffix != ".safetensors":
        return {name: tuple(t.shape) for name, t in _load_bin(file).items()}
    with _safe_open(file) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors or .bin file."""
    return {name: t for name, t, _ in read_tensors(dict.fromkeys(tensor_shapes(file), file))}


def read_tensors(files: dict[str, Path]):
    """Yield (name, tensor, file), one tensor at a time, file by file ({tensor name: file} as checkpoint_files
    gives it). A .bin file is memory-mapped whole; a safetensors tensor is copied into its own memory."""
    for file in dict.fromkeys(files.values()):
        state = None if file.suffix == ".safetensors" else _load_bin(file)
        present = set(tensor_shapes(file) if state is None else state)
        for name in (n for n, f in files.items() if f == file):
            if name not in present:
                raise ValueError(f"{file}: tensor {name} named by the index is not in this file")
            if state is None:
                with _safe_open(file) as f:  # a mapping made for this tensor alone: file pages never pile up in RSS
                    tensor = f.get_tensor(name).clone()
            yield name, tensor if state is None else state[name], file
        del state


def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it: from model.safetensors.index.json, model.safetensors, or .bin files; less
    the `rotary_emb.inv_freq` some older checkpoints carry, which is recomputed here, never loaded."""
    path = Path(path)
    found = [f for f in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json",
                         path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")
    first = found[0]
    files = _files_from_index(first) if first.suffix == ".json" else dict.fromkeys(tensor_shapes(first), first)
    return {name: file for name, file in files.items() if not name.endswith("rotary_emb.inv_freq")}


def _files_from_index(index: Path) -> dict[str, Path]:
    weight_map = load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: malformed index (no weight_map of tensor name -> file name)")
    for name, f in weight_map.items():
        # A shard name is a file of this folder: an index must not make us read anything elsewhere.
        if not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise ValueError(f"{index}: refusing shard {f!r} for {name}: shards must lie inside {index.parent}")
        if not (index.parent / f).is_file():
            raise FileNotFoundError(f"{index.parent / f}: shard named by {index} is missing")
    return {name: index.parent / f for name, f in weight_map.items()}


def fingerprint(path) -> str:
    """A short hash that changes when the checkpoint in `path` does: file names and sizes, and 256 KiB from the
    start, middle and end of every file (the safetensors header among them, and weights: two checkpoints of
    the same architecture share their headers). Cheap for a 7B model."""
    h = hashlib.sha256()
    for file in sorted(set(checkpoint_files(Path(path)).values())):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as f:
            for offset in (0, size // 2, max(0, size - (1 << 18))):
                f.seek(offset)
                h.update(f.read(1 << 18))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- loading a model

_DECODER_LINEAR = re.compile(r"^layers\.\d+\.(self_attn|mlp)\.(%s)\.weight$" % "|".join(DECODER_LINEARS))


def load_model(path, *, dtype=torch.bfloat16, device="cpu", rope_scaling=None, quantize: str | None = None,
               quant_backend: str = "auto") -> Transformer:
    """An HF LLaMA folder as our Transformer in eval mode. rope_scaling (e.g. {"type": "linear", "factor": 2.0})
    replaces the config's: Position Interpolation applied at load time. quantize="nf4" stores the seven decoder
    linears of every layer in NF4 (quant.Linear4bit), quantised as each tensor is read. device "meta": the model's
    structure alone, nothing read (--fsdp shards it first, then each rank reads what it keeps: infra/fsdp.py)."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    args = read_config(path)
    if rope_scaling is not None:
        args.rope_scaling = normalize_rope_scaling(rope_scaling)
    files = checkpoint_files(path)
    check_checkpoint(args, files, config_file(path))
    with torch.device("meta"):
        model = Transformer(args)
    nf4 = dict(compute_dtype=dtype, backend=quant_backend) if quantize == "nf4" else None
    if torch.device(device).type != "meta":
        _load_weights(model, files, dtype, torch.device(device), nf4)
    else:
        model.to(dtype)                 # what loading would give every weight
        for key in [k for k, _ in model.named_parameters() if _DECODER_LINEAR.match(k)] if nf4 else ():
            _put(model, key.removesuffix(".weight"), _meta_nf4(model.get_parameter(key).shape, nf4))
    return model.eval()


def _meta_nf4(shape, nf4: dict) -> Linear4bit:
    """A Linear4bit of a (out, in) weight on the meta device: the shapes of its NF4 tensors (quant.py), no values."""
    n = math.prod(shape)
    blocks = -(-n // 64)
    empty = lambda size, dtype=torch.uint8: torch.empty(size, dtype=dtype, device="meta")     # noqa: E731
    state = NF4State(tuple(shape), nf4["compute_dtype"], 64, empty(blocks), empty(16, torch.float32), 0.0,
                     empty(-(-blocks // NESTED_BLOCKSIZE), torch.float32), NESTED_BLOCKSIZE, empty(256, torch.float32))
    return Linear4bit(empty(((n + 1) // 2, 1)), state, **nf4)


def _weight_name(name: str) -> str:
    """The weight a tensor belongs to: itself, or for bitsandbytes' statistics (`x.weight.absmax`) `x.weight`."""
    return name.partition(".weight.")[0] + ".weight" if ".weight." in name else name


def check_checkpoint(args: ModelArgs, files: dict[str, Path], config_file: Path) -> None:
    """The checkpoint's tensor names and shapes (safetensors headers) against config.json's, before the model is
    built: a config stating a million layers would otherwise be built first, for hours. Every layer has layer 0's
    shapes; a tied lm_head is not read (tied checkpoints sometimes store the shared matrix twice)."""
    layers = {int(m[1]) for name in files if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if args.n_layers > len(layers):
        raise ValueError(f"{config_file}: num_hidden_layers={args.n_layers}, but the checkpoint holds weights for "
                         f"{len(layers)} layers")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(replace(args, n_layers=1)).state_dict().items()
                  if not (args.tie_word_embeddings and k == "lm_head.weight")}
    expected = {re.sub(r"^layers\.0\.", f"layers.{i}.", k) for i in range(args.n_layers) for k in shapes}
    packed = {name.removesuffix(".absmax") for name in files if name.endswith(".weight.absmax")}  # bnb's NF4 bytes
    headers = {file: tensor_shapes(file) for file in set(files.values())}
    for name, file in files.items():
        key = our_key(_weight_name(name))
        if args.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key not in expected:
            raise ValueError(f"{file}: unexpected tensor {name} (not part of a {args.n_layers}-layer LLaMA)")
        shape, want = headers[file].get(name), shapes[re.sub(r"^layers\.\d+\.", "layers.0.", key)]
        if name == hf_key(key) and name not in packed and shape is not None and shape != want:
            raise ValueError(f"{config_file}: does not match the weights: tensor {name} has shape {shape} in "
                             f"{file}, expected {want}")
    missing = sorted(expected - {our_key(_weight_name(name)) for name in files})
    if missing:
        shown = ", ".join(hf_key(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{config_file.parent}: checkpoint is missing {len(missing)} tensor(s): {shown}")


def _load_weights(model: Transformer, files: dict[str, Path], dtype, device, nf4: dict | None) -> None:
    """Fill the meta-device model from the checkpoint's tensors (checked by check_checkpoint), one at a time.
    nf4: Linear4bit's arguments when the decoder linears are to be kept in NF4, else None."""
    tied = model.args.tie_word_embeddings
    stats: dict[str, dict] = {}              # each pre-quantised weight with its statistics, gathered as read
    for name, tensor, file in read_tensors(files):
        key = our_key(_weight_name(name))
        if tied and key == "lm_head.weight":
            continue
        if _weight_name(name) + ".absmax" in files:
            stats.setdefault(_weight_name(name), {})[name] = tensor
            continue
        if not tensor.is_floating_point():  # every weight of the model is: an int tensor is a damaged header
            raise ValueError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected a floating-point weight")
        if tensor.numel():
            check_finite(tensor, name, file, dtype)
        tensor = tensor.to(device=device, dtype=dtype)
        if nf4 and _DECODER_LINEAR.match(key):
            _put(model, key.removesuffix(".weight"), Linear4bit.from_weight(tensor, **nf4))
        else:
            _put(model, key, nn.Parameter(tensor))
        del tensor
    for name, tensors in stats.items():
        _load_prequantized(model, name, tensors, files[name], dtype, device, nf4)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight


def check_finite(tensor: torch.Tensor, name: str, file, dtype) -> None:
    """NaN, inf, or values beyond what `dtype` holds (they would become inf there) are errors naming the tensor."""
    largest = float(tensor.abs().max())        # NaN propagates, so one pass catches all three
    if not largest <= torch.finfo(dtype).max:
        problem = "NaN or inf values" if not math.isfinite(largest) else f"values up to {largest:.3g}, beyond {dtype}"
        raise ValueError(f"{file}: tensor {name} holds {problem}; the checkpoint is damaged or needs another --dtype")


def _load_prequantized(model, name, tensors, file, dtype, device, nf4) -> None:
    """A weight bitsandbytes saved in NF4 (a `*-bnb-4bit` folder): kept in NF4, or dequantised."""
    key = our_key(name)
    if not _DECODER_LINEAR.match(key):
        raise ValueError(f"{file}: {name} is NF4-quantised but only decoder linears can be")
    try:
        state = nf4_state_from_tensors(tensors, prefix=name.removesuffix("weight"))
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if tuple(state.shape) != (want := tuple(model.get_parameter(key).shape)):
        raise ValueError(f"{file}: tensor {name} is quantised with shape {tuple(state.shape)}, expected {want}")
    if nf4:
        _put(model, key.removesuffix(".weight"), Linear4bit(tensors[name], state, **nf4).to(device))
    else:
        _put(model, key, nn.Parameter(dequantize_nf4(tensors[name], state, dtype).to(device)))


def _put(model: nn.Module, key: str, value) -> None:
    """model.<key> = value, for a dotted key ("layers.0.mlp.up_proj")."""
    parent, _, leaf = key.rpartition(".")
    setattr(model.get_submodule(parent), leaf, value)


def load_state(model: Transformer, path) -> None:
    """Copy the tensors of an HF folder written by save_model into `model`'s parameters (resuming full
    fine-tuning)."""
    state = {our_key(n): t for n, t, _ in read_tensors(checkpoint_files(Path(path)))}
    if model.args.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


# --------------------------------------------------------------------------- writing HF folders

def save_checkpoint(tensors, config: dict, out_dir, max_shard_bytes: int = 2 * 1024**3, copy_from=None) -> Path:
    """Write an HF model folder atomically: config.json, safetensors shards (+ index when more than one) and
    the tokenizer files of `copy_from`. `tensors` yields (hf_name, tensor), so a caller can stream one merged
    tensor at a time; a shard is written as soon as it is full."""
    def write(tmp: Path):
        shards, current, size = [], {}, 0

        def flush():
            save_safetensors(current, tmp / f"shard-{len(shards)}")
            shards.append(list(current))

        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[name] = t.detach().contiguous().cpu()
            size += nbytes
        if current:
            flush()
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(tmp / f"shard-{i}", tmp / name)
        if n > 1:
            index = {"metadata": {"total_size": sum((tmp / f).stat().st_size for f in names)},
                     "weight_map": {k: names[i] for i, keys in enumerate(shards) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in Path(copy_from).iterdir() if copy_from is not None else ():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
                shutil.copy2(f, tmp / f.name)

    return atomic.write_dir(out_dir, write)


def save_safetensors(tensors: dict, file: Path) -> None:
    """safetensors.torch.save_file; a failed write (a full disk) raised as the OSError it wraps, which
    atomic.write_dir reports in one line naming the folder, after removing its temporary."""
    try:
        safetensors.torch.save_file(tensors, str(file), metadata={"format": "pt"})
    except safetensors.SafetensorError as e:  # e.g. IoError(Os { code: 28, .., message: "No space left on device" })
        os_error = re.search(r'code: (\d+).*message: "(.*?)"', str(e))
        raise OSError(int(os_error[1]), os_error[2]) if os_error else OSError(errno.EIO, str(e)) from None


def save_model(model: Transformer, out_dir, max_shard_bytes: int = 2 * 1024**3, copy_from=None) -> Path:
    """A dense model as an HF LLaMA folder that transformers loads (models trained or fine-tuned here)."""
    state = model.state_dict()
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return save_checkpoint(((hf_key(k), v) for k, v in state.items()), config_json(model.args), out_dir,
                           max_shard_bytes, copy_from)
