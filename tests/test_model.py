"""model.py + hf.py against HF transformers' LlamaForCausalLM (fp32 logit parity), KV cache, loss, loading errors."""
import dataclasses
import json
import shutil

import pytest
import torch
from conftest import hf_model, make_hf_checkpoint

from infra import hf
from generate import KVCache
from model import MLP, ModelArgs, RMSNorm, Transformer, chunked_cross_entropy, cross_entropy


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def tokens(n, vocab=512, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


def hf_logits(path, ids, config_overrides=None):
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(path)
    for k, v in (config_overrides or {}).items():
        setattr(cfg, k, v)
    with torch.no_grad():
        return hf_model(path, config=cfg)(ids).logits


def our_logits(path, ids, **kwargs):
    model = hf.load_model(path, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(ids)


VARIANTS = {
    "llama2_mha": {},
    "gqa_head_dim": dict(num_key_value_heads=2, head_dim=32),
    "linear_in_config": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                    "rope_theta": 500000.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logit_parity_with_hf(tmp_path, variant):
    path = make_hf_checkpoint(tmp_path / variant, **VARIANTS[variant])
    assert len(list(path.glob("model-*.safetensors"))) > 1       # really sharded
    # 192 > max_position_embeddings=128: dynamic NTK actually rescales, yarn/llama3 go past their range.
    ids = tokens(192)
    err = rel_err(our_logits(path, ids), hf_logits(path, ids))
    assert err <= 1e-4, f"{variant}: max relative error {err:.2e}"


def test_position_interpolation_at_load_time(tmp_path):
    """rope_scaling passed to from_pretrained == HF with the same scaling written into its config, on a
    sequence twice as long as the checkpoint's trained length."""
    path = make_hf_checkpoint(tmp_path / "pi")
    ids = tokens(256, batch=1)
    ours = our_logits(path, ids, rope_scaling={"type": "linear", "factor": 2.0})
    ref = hf_logits(path, ids, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})
    assert rel_err(ours, ref) <= 1e-4
    plain = our_logits(path, ids)
    assert rel_err(plain, ref) > 1e-3          # 10x the tolerance: the override really moved positions


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    path = make_hf_checkpoint(tmp_path / "kv", num_key_value_heads=2)
    model = hf.load_model(path, dtype=torch.float32)
    ids = tokens(40)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.args, 2, capacity=16)          # smaller than the sequence: it grows (twice)
        pieces = [model(ids[:, :25], cache=cache)]           # prefill
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(25, 33)]   # one token at a time
        pieces.append(model(ids[:, 33:], cache=cache))        # a multi-token chunk after the prefix
    assert cache.length == 40 and cache.k.shape[3] == 64
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-5


def test_return_hidden_and_chunked_loss(tmp_path):
    path = make_hf_checkpoint(tmp_path / "loss")
    model = hf.load_model(path, dtype=torch.float32)
    ids = tokens(50)
    labels = ids.clone()
    labels[0, 10:20] = -100
    hidden = model.hidden_states(ids)
    assert hidden.shape == (2, 50, 64)
    logits = model.lm_head(hidden)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1))
    g_ref = torch.autograd.grad(ref, [model.lm_head.weight, model.layers[0].mlp.up_proj.weight])
    loss = chunked_cross_entropy(model.hidden_states(ids), model.lm_head.weight, labels, chunk_size=7)
    g = torch.autograd.grad(loss, [model.lm_head.weight, model.layers[0].mlp.up_proj.weight])
    assert abs(loss.item() - ref.item()) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5
    # frozen head (LoRA training): dh is computed in the forward pass instead of recomputing logits
    model.lm_head.weight.requires_grad_(False)
    for dtype in (torch.float32, torch.bfloat16):
        h = model.hidden_states(ids).to(dtype)
        loss = chunked_cross_entropy(h, model.lm_head.weight.to(dtype), labels, chunk_size=7)
        g = torch.autograd.grad(loss, model.layers[0].mlp.up_proj.weight)[0]
        assert rel_err(g, g_ref[1]) < (1e-5 if dtype == torch.float32 else 2e-2)
    with torch.no_grad():
        assert abs(chunked_cross_entropy(hidden, model.lm_head.weight, labels).item() - ref.item()) < 1e-5
    per_token = chunked_cross_entropy(hidden, model.lm_head.weight, labels, chunk_size=16, reduction="none")
    assert per_token.shape == (2, 49) and (per_token[0, 9:19] == 0).all()
    assert abs(per_token.sum().item() / (labels[:, 1:] != -100).sum().item() - ref.item()) < 1e-5


def plain_twin(model):
    """The same weights with ModelArgs.fused=False: the plain equations instead of the autograd functions."""
    plain = Transformer(dataclasses.replace(model.args, fused=False)).to(model.lm_head.weight.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.train(model.training)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_model_equals_plain_equations(tmp_path, dtype):
    """ModelArgs.fused (the default) changes no forward bit of the logits; the chunked loss and every gradient
    agree with the plain path (plain RMSNorm, F.silu(g) * u, cross_entropy over the full logits) to rounding."""
    path = make_hf_checkpoint(tmp_path / "fused")
    fused = hf.load_model(path, dtype=dtype).train()
    plain = plain_twin(fused)
    assert fused.args.fused and not plain.args.fused and not plain.norm.fused and not plain.layers[0].mlp.fused
    ids = tokens(40)
    labels = ids.clone()
    labels[1, :7] = -100
    with torch.no_grad():
        assert torch.equal(fused(ids), plain(ids))
    fused.loss_chunk = 16
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    results = []
    for model in (fused, plain):
        loss = model.loss(ids, labels, reduction="mean")
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p, **tol)
    for a, b in zip(grads_f, grads_p):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_rmsnorm_and_swiglu_equal_plain_modules(dtype):
    """RMSNorm: same forward bits, gradients to 1 ulp-ish, only x and w saved. MLP: bit-identical forward and
    backward, fused or plain (the fused node saves g and u only)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype)
    dy = torch.randn(3, 5, 64, dtype=dtype)
    norms = [RMSNorm(64, 1e-6, fused).to(dtype) for fused in (True, False)]
    outs = []
    for norm in norms:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
        xi = x.clone().requires_grad_(True)
        y = norm(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, norm.weight.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, b, **tol)

    args = ModelArgs(vocab_size=8, dim=64, intermediate_size=96, n_layers=1, n_heads=4)
    mlps = [MLP(dataclasses.replace(args, fused=fused)).to(dtype) for fused in (True, False)]
    mlps[1].load_state_dict(mlps[0].state_dict())
    outs = []
    for mlp in mlps:
        xi = x.clone().requires_grad_(True)
        y = mlp(xi)
        y.backward(dy)
        outs.append([y.detach(), xi.grad] + [p.grad for p in mlp.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_plain_cross_entropy_is_the_equation():
    """cross_entropy: -log softmax(h_t W^T)[labels_{t+1}], -100 ignored; chunked_cross_entropy agrees."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16), torch.randn(30, 16)
    labels = torch.randint(0, 30, (2, 9))
    labels[0, 3:6] = -100
    logits = hidden[:, :-1] @ weight.t()
    nll = -torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    nll = nll * (labels[:, 1:] != -100)
    torch.testing.assert_close(cross_entropy(hidden, weight, labels, "none"), nll)
    torch.testing.assert_close(cross_entropy(hidden, weight, labels, "sum"), nll.sum())
    torch.testing.assert_close(cross_entropy(hidden, weight, labels), nll.sum() / (labels[:, 1:] != -100).sum())
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 5, reduction),
                                   cross_entropy(hidden, weight, labels, reduction))
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy(hidden, weight, labels, "max")


def test_gradient_checkpointing_same_gradients(tmp_path):
    path = make_hf_checkpoint(tmp_path / "ckpt")
    model = hf.load_model(path, dtype=torch.float32).train()
    model.set_attention("s2")
    ids = tokens(32)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        loss = model.loss(ids, ids, reduction="mean")
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6)


def test_s2_attention_in_forward(tmp_path):
    """attn='s2' with one group equals full attention; with 4 groups it differs (it is really sparse)."""
    path = make_hf_checkpoint(tmp_path / "s2")
    model = hf.load_model(path, dtype=torch.float32)
    ids = tokens(64)
    with torch.no_grad():
        full = model(ids)
        model.set_attention("s2", group_size_ratio=1.0)
        assert rel_err(model(ids), full) <= 1e-5
        model.set_attention("s2", group_size_ratio=0.25)
        assert rel_err(model(ids), full) > 1e-3
    with pytest.raises(ValueError, match="attention must be"):
        model.set_attention("flash")
    with pytest.raises(ValueError, match="decode with attention 'full'"):
        model(ids, cache=KVCache(model.args, 2))


def test_save_pretrained_loads_in_hf(tmp_path):
    path = make_hf_checkpoint(tmp_path / "src", num_key_value_heads=2)
    model = hf.load_model(path, dtype=torch.float32)
    out = hf.save_model(model, tmp_path / "out", max_shard_bytes=100_000, copy_from=path)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()
    ids = tokens(20)
    assert rel_err(hf_logits(out, ids), hf_logits(path, ids)) <= 1e-6


def test_pytorch_bin_fallback(tmp_path):
    path = make_hf_checkpoint(tmp_path / "st")
    ref = hf_model(path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(path / "config.json", bin_dir)
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    ids = tokens(16)
    with torch.no_grad():
        assert rel_err(our_logits(bin_dir, ids), ref(ids).logits) <= 1e-4


def test_dtype_and_device_of_loaded_model(tmp_path):
    path = make_hf_checkpoint(tmp_path / "bf16")
    model = hf.load_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model(tokens(8)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- bad input

def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_index(path, fn):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    fn(index["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def first_shard(path):
    return sorted(path.glob("model-*.safetensors"))[0]


def test_error_missing_tensor(tiny_ckpt):
    edit_index(tiny_ckpt, lambda m: m.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        hf.load_model(tiny_ckpt)


def test_error_unexpected_tensor(tiny_ckpt):
    edit_config(tiny_ckpt, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: unexpected tensor model\.layers\.1\."):
        hf.load_model(tiny_ckpt)


def test_error_wrong_shape(tiny_ckpt):
    edit_config(tiny_ckpt, intermediate_size=128)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* expected"):
        hf.load_model(tiny_ckpt)


def test_error_unsupported_model_type(tiny_ckpt):
    edit_config(tiny_ckpt, model_type="gpt2")
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'gpt2'"):
        hf.load_model(tiny_ckpt)


def test_error_malformed_config(tiny_ckpt):
    (tiny_ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: malformed JSON"):
        hf.load_config(tiny_ckpt)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_config(tiny_ckpt / "nowhere")
    with pytest.raises(ValueError, match="missing hidden_size, intermediate_size"):
        hf.config_to_args({"vocab_size": 8})


def test_error_missing_shard(tiny_ckpt):
    shard = first_shard(tiny_ckpt)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: shard named by .*index.json is missing"):
        hf.load_model(tiny_ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.001])   # cut in the data, cut in the header
def test_error_truncated_safetensors(tiny_ckpt, keep):
    shard = first_shard(tiny_ckpt)
    data = shard.read_bytes()
    shard.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match=f"{shard.name}: .*truncated or corrupt"):
        hf.load_model(tiny_ckpt)


def test_error_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json: missing vocab_size"):
        hf.load_model(tmp_path)
    edit_config(tmp_path, vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_model(tmp_path)
