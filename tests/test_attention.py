"""attention.py against explicit-mask references written from the rules (float64, values and gradients).

Every reference builds the full T x T boolean mask of allowed (query, key) pairs and runs a naive
softmax; S²-Attn's roll reference literally pads, rolls, masks, attends and rolls back.
"""
import math

import pytest
import torch

from attention import causal_attention, repeat_kv, s2_attention

TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- references
def naive_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(D)) over allowed keys; a row with no allowed key outputs 0."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ v


def expand_kv(k, n_heads):
    """GQA the way HF LLaMA assigns heads: query head h reads kv head h // (H / Hkv)."""
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def causal_allowed(n_queries, n_keys):
    """Query i sits at position n_keys - n_queries + i."""
    return torch.tensor([[j <= n_keys - n_queries + i for j in range(n_keys)] for i in range(n_queries)])


def segment_ids(length, boundaries):
    """Segment index of every position, segments [b0, b1), [b1, b2), ... from a boundary list."""
    ids = torch.empty(length, dtype=torch.long)
    for n, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        ids[start:end] = n
    return ids


def group_allowed(ids, key_mask):
    """(B, 1, T, T): causal, same segment, real key."""
    length = len(ids)
    same = ids[:, None] == ids[None, :]
    return (causal_allowed(length, length) & same)[None, None] & key_mask[:, None, None, :]


def reference_s2_segment(q, k, v, g, key_mask):
    """Heads [0, H/2): segments [0, g), [g, 2g) ...; heads [H/2, H): [0, s), [s, s+g), ... cut at T."""
    batch, n_heads, length, _ = q.shape
    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)
    if g >= length:
        plain = [0, length]
        shifted = [0, length]
    else:
        s = g // 2
        plain = sorted(set(list(range(0, length, g)) + [length]))
        shifted = sorted(set([0] + list(range(s, length, g)) + [length]))
    half = n_heads // 2
    out_plain = naive_attention(q[:, :half], k[:, :half], v[:, :half], group_allowed(segment_ids(length, plain), key_mask))
    out_shift = naive_attention(q[:, half:], k[:, half:], v[:, half:], group_allowed(segment_ids(length, shifted), key_mask))
    return torch.cat([out_plain, out_shift], dim=1)


def reference_s2_roll(q, k, v, g, key_mask):
    """LongLoRA's pure-PyTorch path on a sequence padded to a multiple of g (padding = masked keys)."""
    batch, n_heads, length, _ = q.shape
    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)
    padded = -(-length // g) * g
    pad = lambda x: torch.cat([x, x.new_zeros(x.shape[:2] + (padded - length, x.shape[3]))], dim=2)  # noqa: E731
    q, k, v = pad(q), pad(k), pad(v)
    key_mask = torch.cat([key_mask, key_mask.new_zeros(batch, padded - length)], dim=1)
    ids = torch.arange(padded) // g
    s = g // 2
    half = n_heads // 2
    out_plain = naive_attention(q[:, :half], k[:, :half], v[:, :half], group_allowed(ids, key_mask))
    rolled = [torch.roll(x[:, half:], -s, dims=2) for x in (q, k, v)]
    out_shift = naive_attention(*rolled, group_allowed(ids, torch.roll(key_mask, -s, dims=1)))
    out_shift = torch.roll(out_shift, s, dims=2)
    return torch.cat([out_plain, out_shift], dim=1)[:, :, :length]


def reference_s2_none(q, k, v, g, key_mask):
    """No shift: every head attends causally inside [0, g), [g, 2g), ... cut at T."""
    n_heads, length = q.shape[1], q.shape[2]
    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)
    ids = torch.arange(length) // g
    return naive_attention(q, k, v, group_allowed(ids, key_mask))


def reference_s2_roll_published(q, k, v, g, key_mask):
    """LongLoRA's PyTorch path with its attention mask: after the roll, every group of both halves gets a
    first group's block of the (causal + padding) mask, so in-group key i is visible iff token i is real. The
    groups are batch entries b * n + j (n groups per sequence) and the mask blocks are the batch repeated n
    times, so entry b * n + j gets sequence (b * n + j) mod B's block. Our own zero padding up to a multiple
    of g (LongLoRA has none: it refuses such lengths) stays masked."""
    batch, n_heads, length, _ = q.shape
    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)
    padded, s, half = -(-length // g) * g, g // 2, n_heads // 2
    pad = lambda x: torch.cat([x, x.new_zeros(x.shape[:2] + (padded - length, x.shape[3]))], dim=2)  # noqa: E731
    q, k, v = pad(q), pad(k), pad(v)
    first = torch.cat([key_mask, key_mask.new_zeros(batch, padded - length)], dim=1)[:, :g]
    n = padded // g
    blocks = first.repeat(n, 1)                                       # (n * B, g): the batch tiled n times
    in_group = torch.stack([torch.cat([blocks[b * n + j] for j in range(n)]) for b in range(batch)])
    real = (torch.arange(padded) < length).expand(batch, padded)
    ids = torch.arange(padded) // g
    out_plain = naive_attention(q[:, :half], k[:, :half], v[:, :half], group_allowed(ids, in_group & real))
    rolled = [torch.roll(x[:, half:], -s, dims=2) for x in (q, k, v)]
    out_shift = naive_attention(*rolled, group_allowed(ids, in_group & torch.roll(real, -s, dims=1)))
    out_shift = torch.roll(out_shift, s, dims=2)
    return torch.cat([out_plain, out_shift], dim=1)[:, :, :length]


REFERENCES = {"segment": reference_s2_segment, "roll": reference_s2_roll, "none": reference_s2_none,
              "roll-published": reference_s2_roll_published}


# ----------------------------------------------------------------------------- helpers
def random_qkv(batch=2, heads=4, kv_heads=None, length=16, key_length=None, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    key_length = key_length or length
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, key_length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, key_length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    return q, k, v


def assert_same_values_and_grads(fn, ref, q, k, v):
    out, expected = fn(q, k, v), ref(q, k, v)
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, **TOL)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    for name, g, e in zip("qkv", grads, expected_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"grad {name}: {m}")


def all_real(q):
    return torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)


# ----------------------------------------------------------------------------- causal_attention
def test_repeat_kv_gives_each_query_head_its_kv_head():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 1), x)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causal_attention_matches_naive_softmax(kv_heads):
    q, k, v = random_qkv(heads=4, kv_heads=kv_heads, length=11)
    assert_same_values_and_grads(
        causal_attention,
        lambda q, k, v: naive_attention(q, expand_kv(k, 4), expand_kv(v, 4), causal_allowed(11, 11)),
        q, k, v,
    )


@pytest.mark.parametrize("n_queries", [1, 3, 9])
def test_causal_attention_with_kv_cache_equals_last_rows_of_full(n_queries):
    """Tq < Tk: the queries are the last Tq tokens (bottom-right aligned)."""
    q, k, v = random_qkv(heads=4, kv_heads=2, length=12)
    full = causal_attention(q, k, v)
    partial = causal_attention(q[:, :, -n_queries:], k, v)
    torch.testing.assert_close(partial, full[:, :, -n_queries:], **TOL)
    assert_same_values_and_grads(
        causal_attention,
        lambda q, k, v: naive_attention(q, expand_kv(k, 4), expand_kv(v, 4), causal_allowed(n_queries, 12)),
        q[:, :, -n_queries:].detach().requires_grad_(), k, v,
    )


def test_causal_attention_padding_mask():
    """Padding keys are never attended; a left-padding query that sees no key gives 0, not NaN."""
    q, k, v = random_qkv(batch=3, heads=2, length=8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 6:] = False  # right padding
    mask[1, :3] = False  # left padding: queries 0..2 see no real key
    mask[2, [1, 4, 5]] = False
    allowed = causal_allowed(8, 8)[None, None] & mask[:, None, None, :]
    assert_same_values_and_grads(
        lambda q, k, v: causal_attention(q, k, v, key_padding_mask=mask),
        lambda q, k, v: naive_attention(q, k, v, allowed), q, k, v,
    )
    out = causal_attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out[1, :, :3], torch.zeros_like(out[1, :, :3]))
    # changing a padded key/value must not change any output
    k2 = k.detach().clone()
    k2[0, :, 6:] += 100.0
    torch.testing.assert_close(causal_attention(q, k2, v, key_padding_mask=mask), out, **TOL)


def test_causal_attention_padding_mask_with_kv_cache():
    q, k, v = random_qkv(batch=2, heads=4, kv_heads=2, length=3, key_length=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    allowed = causal_allowed(3, 10)[None, None] & mask[:, None, None, :]
    assert_same_values_and_grads(
        lambda q, k, v: causal_attention(q, k, v, key_padding_mask=mask),
        lambda q, k, v: naive_attention(q, expand_kv(k, 4), expand_kv(v, 4), allowed), q, k, v,
    )


def test_causal_attention_never_builds_a_mask_without_padding(monkeypatch):
    """Tq == Tk without padding goes through SDPA's is_causal (no T x T tensor)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = random_qkv(length=32)
    causal_attention(q, k, v)
    assert calls == [(None, True)]


def test_causal_attention_bad_input():
    q, k, v = random_qkv(length=5, key_length=4)
    with pytest.raises(ValueError, match="5 queries but only 4 keys"):
        causal_attention(q, k, v)
    q, k, v = random_qkv(heads=4, kv_heads=3, length=4)
    with pytest.raises(ValueError, match="4 query heads cannot share 3"):
        causal_attention(q, k, v)
    q, k, v = random_qkv(length=4)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(2, 4\)"):
        causal_attention(q, k, v, key_padding_mask=torch.ones(2, 4))


# ----------------------------------------------------------------------------- s2_attention
S2_CASES = [  # (length, group_size)
    (16, 4),  # LongLoRA's setting: ratio 1/4
    (16, 8),
    (24, 6),
    (13, 4),  # not a multiple of g; remainder 1 < g/2
    (14, 4),  # remainder 2 == g/2
    (15, 4),  # remainder 3 > g/2
    (13, 5),  # odd g
    (17, 7),
    (12, 3),
    (10, 2),
    (7, 1),  # every token alone
    (9, 6),
]


@pytest.mark.parametrize("shift", ["segment", "roll", "none"])
@pytest.mark.parametrize("length, group_size", S2_CASES)
def test_s2_attention_matches_explicit_mask_reference(length, group_size, shift):
    q, k, v = random_qkv(length=length, seed=length * 100 + group_size)
    assert_same_values_and_grads(
        lambda q, k, v: s2_attention(q, k, v, group_size=group_size, shift=shift),
        lambda q, k, v: REFERENCES[shift](q, k, v, group_size, all_real(q)),
        q, k, v,
    )


@pytest.mark.parametrize("shift", ["segment", "roll", "none"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_s2_attention_gqa(kv_heads, shift):
    """The head halves split the query heads; every query head keeps its own kv head."""
    q, k, v = random_qkv(heads=8, kv_heads=kv_heads, length=16, seed=3)
    assert_same_values_and_grads(
        lambda q, k, v: s2_attention(q, k, v, group_size=4, shift=shift),
        lambda q, k, v: REFERENCES[shift](q, k, v, 4, all_real(q)),
        q, k, v,
    )


@pytest.mark.parametrize("shift", ["segment", "roll", "none"])
@pytest.mark.parametrize("heads", [1, 3])
def test_s2_attention_odd_head_count_shifts_heads_from_h_over_2(heads, shift):
    q, k, v = random_qkv(heads=heads, length=12, seed=4)
    assert_same_values_and_grads(
        lambda q, k, v: s2_attention(q, k, v, group_size=4, shift=shift),
        lambda q, k, v: REFERENCES[shift](q, k, v, 4, all_real(q)),
        q, k, v,
    )


@pytest.mark.parametrize("shift", ["segment", "roll", "none", "roll-published"])
@pytest.mark.parametrize("length, group_size", [(16, 4), (13, 4), (15, 6)])
def test_s2_attention_padding_mask(length, group_size, shift):
    q, k, v = random_qkv(batch=4, heads=4, kv_heads=2, length=length, seed=5)
    mask = torch.ones(4, length, dtype=torch.bool)
    mask[0, length - 5:] = False  # right padding (batched variable-length sequences)
    mask[1, :6] = False  # left padding: whole groups without a real key
    mask[2, torch.randperm(length, generator=torch.Generator().manual_seed(0))[: length // 3]] = False
    if shift == "roll-published":
        pytest.skip("the published mask lets pad keys through by design: test_s2_roll_published_*")
    assert_same_values_and_grads(
        lambda q, k, v: s2_attention(q, k, v, group_size=group_size, shift=shift, key_padding_mask=mask),
        lambda q, k, v: REFERENCES[shift](q, k, v, group_size, mask),
        q, k, v,
    )
    out = s2_attention(q, k, v, group_size=group_size, shift=shift, key_padding_mask=mask)
    # a padded key must not influence anything
    v2 = v.detach().clone()
    v2[0, :, length - 5:] = 1e6
    torch.testing.assert_close(
        s2_attention(q, k, v2, group_size=group_size, shift=shift, key_padding_mask=mask), out, **TOL)


@pytest.mark.parametrize("extra", [0, 3])
def test_s2_attention_single_group_is_full_causal_attention(extra):
    """group_size >= T (segment mode): one group covers the sequence, nothing to shift."""
    q, k, v = random_qkv(heads=4, kv_heads=2, length=12, seed=6)
    assert_same_values_and_grads(
        lambda q, k, v: s2_attention(q, k, v, group_size=12 + extra),
        causal_attention, q, k, v,
    )
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False
    torch.testing.assert_close(
        s2_attention(q, k, v, group_size=12 + extra, key_padding_mask=mask),
        causal_attention(q, k, v, key_padding_mask=mask), **TOL)


@pytest.mark.parametrize("length, group_size", [(16, 4), (16, 8), (13, 4), (15, 6), (6, 8)])
def test_s2_roll_published_matches_its_mask_rule_on_padded_batches(length, group_size):
    q, k, v = random_qkv(batch=4, heads=4, kv_heads=2, length=length, seed=7)
    mask = torch.ones(4, length, dtype=torch.bool)
    mask[0, length - 5:] = False  # right padding, as LongQLoRA's collator pads
    mask[1, 3:] = False           # a document shorter than a group
    mask[2, torch.randperm(length, generator=torch.Generator().manual_seed(1))[: length // 3]] = False
    assert_same_values_and_grads(
        lambda q, k, v: s2_attention(q, k, v, group_size=group_size, shift="roll-published", key_padding_mask=mask),
        lambda q, k, v: reference_s2_roll_published(q, k, v, group_size, mask), q, k, v)
    # without padding it is the roll variant
    torch.testing.assert_close(s2_attention(q, k, v, group_size=group_size, shift="roll-published"),
                               s2_attention(q, k, v, group_size=group_size, shift="roll"), **TOL)


def test_s2_roll_published_shifted_heads_of_a_short_example_read_padding():
    """The issue's 12-token example: the real tokens sit in the last rolled group at in-group positions >= 12,
    which the first group's mask hides, so the shifted heads of real tokens read pad keys only."""
    q, k, v = random_qkv(batch=1, heads=2, length=64, seed=8)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :12] = True
    v2 = v.detach().clone()
    v2[0, :, 12:] += 1.0
    for shift, moved in (("roll", False), ("roll-published", True)):
        out, out2 = (s2_attention(q, k, x, group_size=32, shift=shift, key_padding_mask=mask) for x in (v, v2))
        assert torch.equal(out[0, 0, :12], out2[0, 0, :12])                 # unshifted head: real keys only
        assert (not torch.allclose(out[0, 1, :12], out2[0, 1, :12])) == moved


def test_s2_roll_wraps_around_like_longlora():
    """Roll mode with g == T keeps LongLoRA's wrap: the shifted heads of the first g/2 tokens see the end."""
    q, k, v = random_qkv(heads=2, length=8, seed=7)
    out = s2_attention(q, k, v, group_size=8, shift="roll")
    torch.testing.assert_close(out, reference_s2_roll(q, k, v, 8, all_real(q)), **TOL)
    full = causal_attention(q, k, v)
    torch.testing.assert_close(out[:, :1], full[:, :1], **TOL)  # unshifted head: one group = causal
    assert not torch.allclose(out[:, 1:, :4], full[:, 1:, :4])
    # the shifted head's token 0 depends on token 7 (future) in roll mode but not in segment mode
    v2 = v.detach().clone()
    v2[:, :, 7] += 1.0
    changed = s2_attention(q, k, v2, group_size=8, shift="roll")
    assert not torch.allclose(changed[:, 1, 0], out[:, 1, 0])
    seg = s2_attention(q, k, v, group_size=4, shift="segment")
    seg2 = s2_attention(q, k, v2, group_size=4, shift="segment")
    torch.testing.assert_close(seg2[:, :, :7], seg[:, :, :7], **TOL)


def test_s2_attention_is_causal_in_segment_mode():
    """No output at position t depends on inputs after t (segment mode has no wrap-around)."""
    q, k, v = random_qkv(length=13, seed=8)
    out = s2_attention(q, k, v, group_size=4)
    for t in range(12):
        grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True)
        for g in grads:
            assert torch.count_nonzero(g[:, :, t + 1:]) == 0


@pytest.mark.parametrize("shift", ["segment", "roll", "none"])
def test_s2_attention_memory_is_per_group(monkeypatch, shift):
    """Every SDPA call works on groups of at most g tokens: O(T * g), never a T x T score tensor."""
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        shapes.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape[-2:])))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = random_qkv(length=64, seed=9)
    mask = torch.ones(2, 64, dtype=torch.bool)
    s2_attention(q, k, v, group_size=16, shift=shift)
    s2_attention(q[:, :, :61], k[:, :, :61], v[:, :, :61], group_size=16, shift=shift)
    s2_attention(q, k, v, group_size=16, shift=shift, key_padding_mask=mask)
    assert shapes and all(tq <= 16 and tk <= 16 and (m is None or m[0] <= 16) for tq, tk, m in shapes)


def test_s2_attention_bad_input():
    q, k, v = random_qkv(length=8)
    with pytest.raises(ValueError, match="shift must be 'segment', 'roll' or 'none'"):
        s2_attention(q, k, v, group_size=4, shift="wrap")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        s2_attention(q, k, v, group_size=0)
    with pytest.raises(ValueError, match="same length"):
        s2_attention(q, k[:, :, :6], v[:, :, :6], group_size=4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        s2_attention(q, k, v, group_size=4, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
