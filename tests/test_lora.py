"""LoRA (lora.py, infra/adapter.py, infra/merge.py): the layer's plain and fused paths, add_lora, merge, and
interoperability with PEFT and HF transformers.

References: PEFT (`get_peft_model`, `PeftModel.from_pretrained`) and transformers' LlamaForCausalLM, used
only here. Parity tests run in fp32 with non-zero lora_B so the adapter actually changes the logits.
"""
import errno
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import safetensors.torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conftest import hf_model, make_hf_checkpoint
from infra import hf
from infra.adapter import load_adapter, save_adapter
from infra.merge import merge_and_export
from lora import LoRALinear, SharedInput, adapter_parameters, add_lora, merge_lora_weights, merged_weight
from model import DECODER_LINEARS, ModelArgs, Transformer

N_LAYERS = 2


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_lora_b(model, std=0.05):
    """B starts at zero (the adapter is a no-op); give it values so the tests see the adapter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, std)


def tiny_args(**kw):
    cfg = dict(vocab_size=97, dim=32, intermediate_size=48, n_layers=N_LAYERS, n_heads=4, max_position_embeddings=64)
    cfg.update(kw)
    return ModelArgs(**cfg)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One HF checkpoint for the module; rope_theta differs from the default so the export must keep it."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("base") / "tiny", rope_theta=20000.0)


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 512, (2, 24))


def load_ours(path, **kw):
    return hf.load_model(path, dtype=torch.float32, **kw)


# --------------------------------------------------------------------------- the layer

FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])


@FUSED
def test_lora_linear_init_and_forward_formula(fused):
    torch.manual_seed(0)
    base = nn.Linear(20, 12, bias=True)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0, fused=fused)
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(20)                       # kaiming_uniform(a=sqrt(5)) on a (r, in) matrix
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    x = torch.randn(3, 5, 20)
    assert torch.equal(layer(x), base(x))           # B = 0: exactly the base model
    randomize_lora_b(layer)
    ref = (x.double() @ base.weight.double().T + base.bias.double()
           + 2.0 * x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_merged_weight_equals_the_lora_layer(dtype, tol):
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(dtype)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.1).eval()
    randomize_lora_b(layer, std=0.2)
    x = torch.randn(4, 64).to(dtype)
    merged = merged_weight(base.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    # W + scaling * B @ A computed in fp32, cast once
    expected = (base.weight.float() + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()).to(dtype)
    assert merged.dtype == dtype and torch.equal(merged, expected)
    with torch.no_grad():
        assert rel_err(F.linear(x, merged).float(), layer(x).float()) < tol
    with pytest.raises(ValueError, match="do not fit a weight of shape"):
        merged_weight(base.weight.detach().T, layer.lora_A, layer.lora_B, 1.0)


@FUSED
def test_lora_path_is_fp32_and_output_keeps_base_dtype(fused):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16, bias=False).to(torch.bfloat16), r=4, alpha=16, dropout=0.0, fused=fused)
    randomize_lora_b(layer)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer.base_layer(x) + (4.0 * x.float() @ layer.lora_A.T @ layer.lora_B.T).to(torch.bfloat16)
    assert torch.equal(y, ref)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad is not None


@FUSED
def test_dropout_applies_only_to_lora_input(fused):
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5, fused=fused)
    x = torch.randn(8, 32)
    layer.train()
    assert torch.equal(layer(x), base(x))            # B = 0: dropout never touches the base path
    randomize_lora_b(layer, std=0.5)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(y, base(x) + dropped @ layer.lora_A.T @ layer.lora_B.T, rtol=1e-5, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.lora_A.T @ layer.lora_B.T, rtol=1e-5, atol=1e-6)


@FUSED
def test_lora_over_linear4bit_is_dequantized_base_plus_lora(fused):
    quant = pytest.importorskip("quant")
    torch.manual_seed(0)
    q = quant.Linear4bit.from_weight(torch.randn(48, 64), compute_dtype=torch.float32)
    layer = LoRALinear(q, r=8, alpha=16, dropout=0.0, fused=fused)
    randomize_lora_b(layer)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    w = q.dequantize().float()
    ref = x @ w.T + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    assert not any(p.requires_grad for p in q.parameters())


def autograd_lora(base, layer, x, p, seed):
    """The LoRA layer as plain autograd writes it (PEFT's arithmetic): base(x) + B(s * A(dropout(x.float())))."""
    torch.manual_seed(seed)
    dropped = F.dropout(x.float(), p, training=p > 0)
    y = base(x)
    return y + F.linear(F.linear(dropped, layer.lora_A) * layer.scaling, layer.lora_B).to(y.dtype)


def grads_of(fn, x, layer):
    x = x.detach().clone().requires_grad_(True)
    for prm in (layer.lora_A, layer.lora_B):
        prm.grad = None
    y = fn(x)
    torch.manual_seed(7)
    y.backward(torch.randn_like(y))
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_lora_node_has_autograds_bits_in_one_chunk(kind, dtype, p):
    """The fused path, lora._LoRALinearFn (base + LoRA as one node, the dropped-out input rebuilt from a 1-byte
    mask), against the plain path and autograd over the same formula: the same dropout draws and the same bits,
    forward and every gradient."""
    import quant
    torch.manual_seed(0)
    if kind == "nf4":
        base = quant.Linear4bit.from_weight(torch.randn(24, 40), compute_dtype=dtype)
    else:
        base = nn.Linear(40, 24, bias=True).to(dtype).requires_grad_(False)
    layer = LoRALinear(base, r=8, alpha=16, dropout=p)
    randomize_lora_b(layer, std=0.3)
    layer.train()
    x = torch.randn(3, 5, 40, dtype=dtype)

    def run(inp):
        torch.manual_seed(11)
        return layer(inp)

    ours = grads_of(run, x, layer)
    layer.fused = False
    plain = grads_of(run, x, layer)
    ref = grads_of(lambda inp: autograd_lora(base, layer, inp, p, 11), x, layer)
    for a, b, c in zip(ours, plain, ref):
        assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(b, c)


def test_fused_lora_node_in_many_chunks_matches_autograd(monkeypatch):
    """More tokens than one chunk: the same arithmetic, but the matmul kernels see fewer rows at a time (they
    block differently) and grad A, grad B are summed chunk by chunk: equal to fp32 rounding."""
    import lora
    monkeypatch.setattr(lora, "LORA_CHUNK_ELEMENTS", 64)        # 1-2 tokens per chunk
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=False).requires_grad_(False)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.2)
    randomize_lora_b(layer, std=0.3)
    layer.train()
    x = torch.randn(4, 9, 40)

    def run(inp):
        torch.manual_seed(3)
        return layer(inp)

    ours = grads_of(run, x, layer)
    layer.fused = False
    plain = grads_of(run, x, layer)
    ref = grads_of(lambda inp: autograd_lora(base, layer, inp, 0.2, 3), x, layer)
    for a, b, c in zip(ours, plain, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)


def test_lora_over_a_trained_base_updates_in_place_with_autograds_bits():
    """A base autograd differentiates itself (not frozen) takes the plain path, even with fused=True."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    base.requires_grad_(True)
    randomize_lora_b(layer)
    x = torch.randn(6, 16)
    ours = grads_of(layer, x, layer)
    w_grad = base.weight.grad.clone()
    base.weight.grad = None
    ref = grads_of(lambda inp: autograd_lora(base, layer, inp, 0.0, 0), x, layer)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert torch.equal(w_grad, base.weight.grad)


def test_shared_input_draws_one_dropout_mask_per_group():
    shared = SharedInput(readers=3)
    x = torch.randn(4, 8)
    dropout = nn.Dropout(0.5).train()
    a, b, c = shared.mask(x, dropout), shared.mask(x, dropout), shared.mask(x, dropout)
    assert a is b is c and shared.value is None                 # let go after the last reader
    assert not torch.equal(shared.mask(x, dropout)[0], a[0])    # a new forward draws a new mask


def test_add_lora_shares_dropout_masks_only_on_the_fused_path():
    model = Transformer(tiny_args())
    add_lora(model, r=4, dropout=0.1)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.q_proj.input is attn.k_proj.input is attn.v_proj.input and attn.q_proj.input.readers == 3
    assert mlp.gate_proj.input is mlp.up_proj.input is not mlp.down_proj.input
    assert attn.o_proj.input is not attn.q_proj.input and attn.o_proj.input.readers == 1
    plain = Transformer(tiny_args())
    add_lora(plain, r=4, dropout=0.1, fused=False)
    assert not any(m.fused for m in plain.modules() if isinstance(m, LoRALinear))
    assert plain.layers[0].self_attn.q_proj.input is not plain.layers[0].self_attn.k_proj.input


def test_fused_path_with_one_mask_per_projection_draws_the_plain_paths_masks():
    """shared_dropout=False (PEFT's masks, train.py --lora-dropout-masks per-projection): every layer draws its
    own mask, in the plain path's order, so the fused model's training forward is the plain one's bit for bit."""
    outs = []
    for kw in (dict(fused=True, shared_dropout=False), dict(fused=False), dict(fused=True)):
        torch.manual_seed(0)
        model = Transformer(tiny_args())
        add_lora(model, r=4, alpha=8, dropout=0.3, **kw)
        randomize_lora_b(model)
        torch.manual_seed(1)
        outs.append(model.train()(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))))
    attn = model.layers[0].self_attn
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[2], outs[1])
    assert attn.q_proj.input is attn.k_proj.input       # the default shares


def test_fused_and_plain_models_agree():
    """A whole model: the same forward bits; the gradients to fp32 rounding, because autograd sums the input
    gradients of siblings (q, k, v read one x) in another order than the fused nodes, which add base + LoRA first."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = Transformer(tiny_args())
        trainable = add_lora(model, r=4, alpha=8, dropout=0.0, fused=fused)
        randomize_lora_b(model)
        out = model(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1)))
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in trainable]))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    assert torch.equal(fused_out, plain_out)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- add_lora

def test_add_lora_wraps_targets_and_freezes_the_rest():
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    params = add_lora(model, r=4, alpha=8, dropout=0.05)
    lora_names = [n for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    assert len(lora_names) == 2 * len(DECODER_LINEARS) * N_LAYERS
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in lora_names}
    assert len(params) == len(lora_names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_names)
    assert isinstance(model.layers[1].mlp.down_proj, LoRALinear)
    assert isinstance(model.lm_head, nn.Linear)      # never adapted
    assert model.lora_config == dict(r=4, alpha=8, dropout=0.05, targets=DECODER_LINEARS, train_embed_norm=False,
                                     training=None)
    loss = model(torch.randint(0, 97, (1, 8))).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params if p.shape[0] != 4)   # lora_B gets a gradient at B = 0
    assert model.embed_tokens.weight.grad is None and model.layers[0].self_attn.q_proj.base_layer.weight.grad is None
    assert set(adapter_parameters(model)) == set(lora_names)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


def test_add_lora_plus_trains_embeddings_and_norms():
    model = Transformer(tiny_args())
    params = add_lora(model, r=4, targets=("q_proj", "v_proj"), train_embed_norm=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"layers.{i}.{n}.weight" for i in range(N_LAYERS) for n in ("input_layernorm", "post_attention_layernorm")}
    lora = {f"layers.{i}.self_attn.{m}.{ab}" for i in range(N_LAYERS) for m in ("q_proj", "v_proj")
            for ab in ("lora_A", "lora_B")}
    assert trainable == lora | norms | {"embed_tokens.weight", "norm.weight"}
    assert len(params) == len(trainable)
    assert set(adapter_parameters(model)) == trainable
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)


def test_add_lora_bad_targets():
    with pytest.raises(ValueError, match="lm_head"):
        add_lora(Transformer(tiny_args()), targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="qproj"):
        add_lora(Transformer(tiny_args()), targets=("qproj",))


def test_merge_lora_weights_pure_function_equals_the_adapted_model():
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()         # eval: no LoRA dropout
    add_lora(model, r=4, alpha=16)
    randomize_lora_b(model)
    base = {hf.hf_key(k.replace(".base_layer", "")): v.clone() for k, v in model.state_dict().items()
            if not k.endswith((".lora_A", ".lora_B"))}
    lora = {k: p.detach() for k, p in adapter_parameters(model).items()}
    merged = merge_lora_weights(base, lora, scaling=4.0)
    assert set(merged) == set(base)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])
    dense = Transformer(tiny_args()).eval()
    dense.load_state_dict({hf.our_key(k): v for k, v in merged.items()})
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert rel_err(dense(tokens), model(tokens)) < 1e-5
    with pytest.raises(ValueError, match="lacks"):
        merge_lora_weights({}, lora, scaling=4.0)


# --------------------------------------------------------------------------- files: ours <-> PEFT

def test_save_adapter_writes_peft_format(tmp_path):
    model = Transformer(tiny_args())
    add_lora(model, r=4, alpha=8, dropout=0.05)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    assert cfg["target_modules"] == sorted(DECODER_LINEARS)
    assert cfg["base_model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    sd = load_file(out / "adapter_model.safetensors")
    assert len(sd) == 2 * 7 * N_LAYERS
    a = sd["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"]
    assert a.shape == (4, 32) and a.dtype == torch.float32
    assert torch.equal(a, model.layers[1].mlp.gate_proj.lora_A.detach())
    assert not (out / "trainable_params.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]      # no temp folders left behind


def test_save_adapter_replaces_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    model = Transformer(tiny_args())
    add_lora(model, r=4)
    out = tmp_path / "adapter"
    save_adapter(model, out)
    before = load_file(out / "adapter_model.safetensors")
    randomize_lora_b(model)
    save_adapter(model, out)                         # overwrite an existing adapter
    after = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.count_nonzero(before[key]) == 0 and torch.count_nonzero(after[key]) > 0

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, out)
    assert torch.equal(load_file(out / "adapter_model.safetensors")[key], after[key])   # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_our_adapter_loads_in_peft_with_same_logits(ckpt, tokens, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    ours = load_ours(ckpt)
    add_lora(ours, r=8, alpha=16, dropout=0.05)
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    peft_model = PeftModel.from_pretrained(hf_model(ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(tokens).logits
        base = hf_model(ckpt)(tokens).logits
        got = ours.eval()(tokens)
    assert rel_err(ref, base) > 1e-3                  # the adapter changes the logits
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("with_adapter_name", [False, True])
def test_peft_adapter_loads_in_ours_with_same_logits(ckpt, tokens, tmp_path, with_adapter_name):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(DECODER_LINEARS), lora_dropout=0.05,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model(ckpt), config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    if with_adapter_name:   # some tools save PEFT's in-memory names, which keep the adapter name
        f = tmp_path / "adapter" / "adapter_model.safetensors"
        sd = load_file(f)
        save_file({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, f)
    ours = load_adapter(load_ours(ckpt), tmp_path / "adapter").eval()
    assert ours.lora_config["r"] == 8 and ours.lora_config["alpha"] == 16
    assert set(ours.lora_config["targets"]) == set(DECODER_LINEARS)
    with torch.no_grad():
        ref = peft_model.eval()(tokens).logits
        got = ours(tokens)
    assert rel_err(got, ref) <= 1e-5


def test_adapter_round_trip_with_lora_plus(ckpt, tokens, tmp_path):
    torch.manual_seed(0)
    ours = load_ours(ckpt)
    add_lora(ours, r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"), train_embed_norm=True)
    randomize_lora_b(ours)
    with torch.no_grad():
        ours.embed_tokens.weight.add_(0.1 * torch.randn_like(ours.embed_tokens.weight))
        ours.layers[1].post_attention_layernorm.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "adapter")
    extra = load_file(tmp_path / "adapter" / "trainable_params.safetensors")
    assert set(extra) == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(N_LAYERS) for n in ("input_layernorm", "post_attention_layernorm")}
    loaded = load_adapter(load_ours(ckpt), tmp_path / "adapter")
    assert loaded.lora_config["train_embed_norm"] is True
    assert loaded.embed_tokens.weight.requires_grad
    with torch.no_grad():
        assert rel_err(loaded.eval()(tokens), ours.eval()(tokens)) < 1e-6
    # loading into a model that already has the same LoRA replaces the values, and alpha is the file's
    again = load_ours(ckpt)
    add_lora(again, r=4, alpha=64, targets=("v_proj", "q_proj", "down_proj"), train_embed_norm=True)
    load_adapter(again, tmp_path / "adapter")
    assert again.lora_config["alpha"] == 16 and again.layers[0].self_attn.q_proj.scaling == 4.0
    with torch.no_grad():
        assert rel_err(again.eval()(tokens), ours(tokens)) < 1e-6


def test_reads_longlora_trainable_params_bin(ckpt, tokens, tmp_path):
    """LongLoRA saves LoRA+ embeddings/norms with torch.save under PeftModel state-dict names."""
    torch.manual_seed(0)
    ours = load_ours(ckpt)
    add_lora(ours, r=4, alpha=16, targets=("q_proj",))
    save_adapter(ours, tmp_path / "adapter")
    new_norm = torch.rand(64) + 0.5
    torch.save({"base_model.model.model.norm.weight": new_norm}, tmp_path / "adapter" / "trainable_params.bin")
    loaded = load_adapter(load_ours(ckpt), tmp_path / "adapter")
    assert torch.equal(loaded.norm.weight.detach(), new_norm) and loaded.norm.weight.requires_grad
    assert loaded.lora_config["train_embed_norm"] is True


# --------------------------------------------------------------------------- merge_and_export

def test_merged_export_loads_in_transformers_with_rope_scaling(ckpt, tmp_path):
    torch.manual_seed(0)
    scaling = {"type": "linear", "factor": 2.0}
    ours = load_ours(ckpt, rope_scaling=scaling)
    add_lora(ours, r=8, alpha=16, train_embed_norm=True)
    randomize_lora_b(ours)
    with torch.no_grad():
        ours.norm.weight.mul_(0.7)
    save_adapter(ours, tmp_path / "adapter", training={"rope_scaling": ours.args.rope_scaling, "ctx": 256})
    out, written, source = merge_and_export(ckpt, tmp_path / "adapter", tmp_path / "merged", max_shard_bytes=100_000)
    assert written == {"rope_type": "linear", "factor": 2.0} and source.endswith("longqlora.json")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"type": "linear", "factor": 2.0} and cfg["rope_theta"] == 20000.0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    hf = hf_model(out)
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 2.0
    tokens = torch.randint(0, 512, (2, 100))         # past half the trained context: PI matters here
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours.eval()(tokens)
        unscaled = load_ours(ckpt)(tokens)
    assert rel_err(got, ref) <= 1e-5
    assert rel_err(unscaled, ref) > 1e-2
    # and our own loader reads the export back without the adapter
    with torch.no_grad():
        assert rel_err(load_ours(out)(tokens), ref) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_merged_export_of_nf4_trained_adapter_uses_16bit_originals(tmp_path):
    quant = pytest.importorskip("quant")
    base = make_hf_checkpoint(tmp_path / "base16", dtype=torch.bfloat16)
    torch.manual_seed(0)
    nf4 = hf.load_model(base, dtype=torch.float32, quantize="nf4")
    add_lora(nf4, r=4, alpha=16)
    randomize_lora_b(nf4)
    save_adapter(nf4, tmp_path / "adapter")
    out, _, _ = merge_and_export(base, tmp_path / "adapter", tmp_path / "merged", rope_factor=1)
    # the adapter also loads back into a fresh NF4 model
    tokens = torch.randint(0, 512, (1, 16))
    again = load_adapter(hf.load_model(base, dtype=torch.float32, quantize="nf4"), tmp_path / "adapter")
    assert isinstance(again.layers[0].mlp.up_proj.base_layer, quant.Linear4bit)
    with torch.no_grad():
        assert rel_err(again.eval()(tokens), nf4.eval()(tokens)) < 1e-6
    original = {}
    for f in base.glob("*.safetensors"):
        original.update(load_file(f))
    key = "model.layers.0.mlp.up_proj.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][key] \
        if (out / "model.safetensors.index.json").exists() else "model.safetensors"
    merged = load_file(out / shard)[key]
    assert merged.dtype == torch.bfloat16
    lora = nf4.layers[0].mlp.up_proj
    expected = (original[key].float() + 4.0 * lora.lora_B.detach() @ lora.lora_A.detach()).to(torch.bfloat16)
    assert torch.equal(merged, expected)


# --------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def saved_adapter(ckpt, tmp_path_factory):
    torch.manual_seed(0)
    model = load_ours(ckpt)
    add_lora(model, r=8, alpha=16)
    randomize_lora_b(model)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "good")


def copy_adapter(src, dst, config_changes=None, tensor_filter=None):
    import shutil
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor_filter:
        f = dst / "adapter_model.safetensors"
        save_file(tensor_filter(load_file(f)), f)
    return dst


def test_missing_dir_and_files(ckpt, saved_adapter, tmp_path):
    model = load_ours(ckpt)
    with pytest.raises(FileNotFoundError, match="nowhere.*not found"):
        load_adapter(model, tmp_path / "nowhere")
    bad = copy_adapter(saved_adapter, tmp_path / "noweights")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(model, bad)
    bad = copy_adapter(saved_adapter, tmp_path / "noconfig")
    (bad / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, bad)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_and_export(ckpt, bad, tmp_path / "out")
    assert not hasattr(model, "lora_config") or model.lora_config is None
    assert not (tmp_path / "out").exists()


def test_wrong_peft_type_and_r_mismatch(ckpt, saved_adapter, tmp_path):
    model = load_ours(ckpt)
    with pytest.raises(ValueError, match="adapter_config.json.*peft_type.*PREFIX_TUNING"):
        load_adapter(model, copy_adapter(saved_adapter, tmp_path / "pt", {"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*rank 8.*r=16"):
        load_adapter(model, copy_adapter(saved_adapter, tmp_path / "r16", {"r": 16}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(model, copy_adapter(saved_adapter, tmp_path / "dora", {"use_dora": True}))
    assert getattr(model, "lora_config", None) is None            # nothing was changed
    other = load_ours(ckpt)
    add_lora(other, r=4)
    with pytest.raises(ValueError, match="r=8.*r=4"):
        load_adapter(other, saved_adapter)
    other = load_ours(ckpt)
    add_lora(other, r=8, targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="targets"):
        load_adapter(other, saved_adapter)


def test_target_modules_the_model_lacks(ckpt, saved_adapter, tmp_path):
    bad = copy_adapter(saved_adapter, tmp_path / "gpt2", {"target_modules": ["c_attn", "q_proj"]})
    with pytest.raises(ValueError, match=r"adapter_config.json.*\['c_attn'\]"):
        load_adapter(load_ours(ckpt), bad)


def test_missing_and_unexpected_tensors(ckpt, saved_adapter, tmp_path):
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    bad = copy_adapter(saved_adapter, tmp_path / "missing", tensor_filter=lambda sd: {k: v for k, v in sd.items()
                                                                                     if k != gone})
    with pytest.raises(ValueError, match=f"adapter_model.safetensors.*missing.*{gone}"):
        load_adapter(load_ours(ckpt), bad)
    # tensors for modules the config does not target
    bad = copy_adapter(saved_adapter, tmp_path / "extra", {"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="adapter_model.safetensors.*does not target"):
        load_adapter(load_ours(ckpt), bad)
    # a tensor that is not LoRA at all
    bad = copy_adapter(saved_adapter, tmp_path / "foreign",
                       tensor_filter=lambda sd: {**sd, "base_model.model.model.norm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="unexpected tensor base_model.model.model.norm.weight"):
        load_adapter(load_ours(ckpt), bad)


def test_adapter_of_another_model_is_refused(ckpt, saved_adapter, tmp_path):
    wide = make_hf_checkpoint(tmp_path / "wide", hidden_size=96, num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*shape \(8, 64\).*\(8, 96\).*different model"):
        load_adapter(load_ours(wide), saved_adapter)
    with pytest.raises(ValueError, match="adapter_model.safetensors.*different model"):
        merge_and_export(wide, saved_adapter, tmp_path / "out", rope_factor=1)
    assert not (tmp_path / "out").exists()
    deeper = make_hf_checkpoint(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(ValueError, match="missing.*layers.2"):
        load_adapter(load_ours(deeper), saved_adapter)


def test_export_refuses_quantized_base(ckpt, saved_adapter, tmp_path):
    import shutil
    base = tmp_path / "bnb"
    shutil.copytree(ckpt, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*16-bit"):
        merge_and_export(base, saved_adapter, tmp_path / "out")


def test_merge_cli_carries_the_training_factor_round_trip_with_peft_and_transformers(ckpt, tmp_path, capsys):
    """train.py at ctx 256 on a 128-token model (PI factor 2) writes the factor into the adapter folder;
    `python -m infra.merge` reads it, and the merged model, PEFT on the base with that factor, and our
    base + adapter all give the same logits."""
    from infra import cli, merge
    import generate
    import train
    from conftest import PG19_MINI
    from peft import PeftModel
    from transformers import LlamaConfig

    out = tmp_path / "run"
    train.main(["--model", str(ckpt), "--data", str(PG19_MINI), "--split", "validation", "--cache-dir",
                str(tmp_path / "cache"), "--out", str(out), "--ctx", "256", "--max-steps", "2", "--lr", "1e-2",
                "--warmup", "0", "--lora-r", "8", "--dtype", "fp32", "--save-every", "0", "--log-every", "100"])
    info = json.loads((out / "adapter" / "longqlora.json").read_text())
    assert info["rope_scaling"] == {"factor": 2.0, "rope_type": "linear"} and info["ctx"] == 256
    capsys.readouterr()
    assert cli.run(merge.main, ["--base", str(ckpt), "--adapter", str(out / "adapter"),
                                "--out", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "rope_scaling {'type': 'linear', 'factor': 2.0}" in printed and "longqlora.json" in printed
    tokens = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        merged = hf_model(tmp_path / "merged")(tokens).logits
        cfg = LlamaConfig.from_pretrained(ckpt)
        cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}
        peft = PeftModel.from_pretrained(hf_model(ckpt, config=cfg), out / "adapter").eval()(tokens).logits
        ours = generate.load_model(ckpt, out / "adapter", dtype=torch.float32)[0](tokens)
        base = hf_model(ckpt, config=cfg)(tokens).logits
    assert rel_err(merged, peft) <= 1e-5 and rel_err(ours, peft) <= 1e-5
    assert rel_err(base, peft) > 1e-4                  # the adapter did change the model
    # no record and no --rope-factor: refused, nothing written
    (out / "adapter" / "longqlora.json").unlink()
    assert cli.run(merge.main, ["--base", str(ckpt), "--adapter", str(out / "adapter"),
                                "--out", str(tmp_path / "again")]) == 2
    assert "the RoPE scaling this adapter was trained with is unknown" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_merge_help_answers_before_torch_is_imported():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import runpy, sys\n"
            "sys.argv = ['infra.merge', '--help']\n"
            "try:\n"
            "    runpy.run_module('infra.merge', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')\n")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().endswith("NO TORCH"), p.stdout[-500:] + p.stderr[-500:]
    assert "--base" in p.stdout and "--rope-factor" in p.stdout and "(default: None)" not in p.stdout


# --------------------------------------------------------------------------- what a merge may overwrite

def tree_state(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_merge_never_replaces_an_input_the_current_folder_or_unasked_a_non_empty_one(ckpt, saved_adapter, tmp_path,
                                                                                      monkeypatch, capsys):
    """--out: the base, the adapter or a folder holding either, and the current folder (or one above it), are
    refused even with --overwrite; a training run or any non-empty folder only without it. Nothing is touched."""
    import shutil
    from infra import cli, merge

    work = tmp_path / "work"
    base, run, other_run, full = work / "base", work / "run", work / "other_run", work / "full"
    shutil.copytree(ckpt, base)
    shutil.copytree(saved_adapter, run / "adapter")
    (run / "train_config.json").write_text("{}")
    other_run.mkdir()
    (other_run / "train_config.json").write_text("{}")
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    (work / "empty").mkdir()
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")
    before = tree_state(work)

    def merge_cli(out, *flags):
        capsys.readouterr()
        code = cli.run(merge.main, ["--base", str(base), "--adapter", str(run / "adapter"), "--out", str(out),
                                    "--rope-factor", "1", *flags])
        return code, capsys.readouterr().err

    always = {base: "input", run / "adapter": "input", run: "input", work: "input", ".": "current folder",
              str(run / ".."): "input"}
    for out, message in always.items():
        for flags in ((), ("--overwrite",)):
            code, err = merge_cli(out, *flags)
            assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --out {out}") and message in err, \
                (out, flags, err)
    code, err = merge_cli(other_run)
    assert code == 2 and "train_config.json" in err and "--overwrite" in err
    code, err = merge_cli(full)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert tree_state(work) == before                                  # every refusal before anything changed
    assert merge_cli(work / "empty")[0] == 0 and (work / "empty" / "config.json").is_file()
    for out in (other_run, full):
        assert merge_cli(out, "--overwrite")[0] == 0
        assert (out / "config.json").is_file() and not (out / "train_config.json").exists()
    assert tree_state(base) == {k[len("base/"):]: v for k, v in before.items() if k.startswith("base/")}


def test_merge_needs_the_tokenizer_our_scripts_need(ckpt, saved_adapter, tmp_path):
    """eval.py and generate.py read tokenizer.model from the model folder: a base without it is refused before
    anything is written, unless the adapter folder holds one, which is copied."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(ckpt, base)
    (base / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"base/tokenizer.model: not found.*eval.py and generate.py"):
        merge_and_export(base, saved_adapter, tmp_path / "merged", rope_factor=1)
    assert not (tmp_path / "merged").exists()
    adapter = shutil.copytree(saved_adapter, tmp_path / "adapter")
    shutil.copy(ckpt / "tokenizer.model", adapter / "tokenizer.model")
    out, _, _ = merge_and_export(base, adapter, tmp_path / "merged", rope_factor=1)
    assert (out / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"])
def test_merge_refuses_a_base_weight_with_nan(ckpt, saved_adapter, tmp_path, name):
    """A NaN in the base (a LoRA target or not) is named, not written into the merged model."""
    import shutil

    base = shutil.copytree(ckpt, tmp_path / "base")
    file = next(f for f in base.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(file)
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{file.name}: {name} holds NaN or inf"):
        merge_and_export(base, saved_adapter, tmp_path / "merged", rope_factor=1)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })')], ids=["OSError", "SafetensorError"])
def test_merge_out_of_disk_is_one_error_naming_the_folder_and_leaves_nothing(ckpt, saved_adapter, tmp_path,
                                                                             monkeypatch, capsys, error):
    """safetensors reports a full disk as its own SafetensorError, which used to escape as a library message."""
    from infra import cli, merge

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "out" / "merged"
    argv = ["--base", str(ckpt), "--adapter", str(saved_adapter), "--out", str(out), "--rope-factor", "1"]
    assert cli.run(merge.main, argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: cannot write (No space left on device)\n"
    assert list((tmp_path / "out").iterdir()) == []          # the atomic writer's temporary folder is gone


def test_adapter_weights_that_are_not_finite_or_overflow_the_merge_are_refused(ckpt, saved_adapter, tmp_path):
    """NaN / inf in an adapter file: refused at load, naming the tensor and the file. 1e18 is finite, but a merged
    weight of 1e36 is inf in fp16: the merge refuses it rather than write inf."""
    a = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    b = a.replace("lora_A", "lora_B")

    def poke(value):
        def edit(sd):
            sd[a].view(-1)[0], sd[b].view(-1)[0] = value, value
            return sd
        return edit

    for value in (float("nan"), float("inf")):
        bad = copy_adapter(saved_adapter, tmp_path / f"a{value}", tensor_filter=poke(value))
        for load in (lambda: load_adapter(load_ours(ckpt), bad),
                     lambda: merge_and_export(ckpt, bad, tmp_path / "out", rope_factor=1)):
            with pytest.raises(ValueError, match=f"{bad / 'adapter_model.safetensors'}: {a} holds NaN or inf"):
                load()
    huge = copy_adapter(saved_adapter, tmp_path / "huge", tensor_filter=poke(1e18))
    half = make_hf_checkpoint(tmp_path / "half", dtype=torch.float16, rope_theta=20000.0)
    with pytest.raises(ValueError, match=f"{huge / 'adapter_model.safetensors'}: the LoRA update of "
                                         "model.layers.0.mlp.up_proj.weight overflows torch.float16"):
        merge_and_export(half, huge, tmp_path / "out", rope_factor=1)
    assert not (tmp_path / "out").exists()
