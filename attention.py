"""Causal attention for inference and Shifted Sparse Attention (S²-Attn, LongLoRA §3.2) for training.

All tensors are (B, H, T, D). Scores are softmax(q k^T / sqrt(D)) over the keys a query may see, computed by
torch's scaled_dot_product_attention (SDPA), so flash / memory-efficient kernels are used where the device has
them. K/V may have fewer heads than Q (GQA): query head h reads kv head h // (H / Hkv), as in HF LLaMA.

causal_attention: query i of Tq sits at absolute position Tk - Tq + i (bottom-right alignment: the last Tq of
Tk tokens, as when decoding with a KV cache) and sees keys j <= Tk - Tq + i.

s2_attention (used by LongQLoRA during fine-tuning only), group size g, shift s = g // 2:
  * heads [0, H/2) attend causally inside the groups [0, g), [g, 2g), ...
  * heads [H/2, H) do the same on the sequence shifted by s, i.e. inside [0, s), [s, s+g), [s+g, s+2g), ...,
    the last one cut at T, no wrap-around (shift="segment", what LongLoRA's flash-attn path does), so that
    information crosses the boundaries of the first half's groups; then the two halves are joined again.
  Cost O(T * g) time and memory: the sequence is cut into groups that become extra batch entries.
  T not a multiple of g: the last group is shorter. g >= T: one group covers everything, so there is nothing
  to shift: plain causal attention (the roll variants below still roll, as LongLoRA does).
Variants (shift=):
  "roll":  LongLoRA's pure-PyTorch path: roll q, k, v left by s, attend inside groups, roll the output back.
           The last group then holds the final tokens *followed by* the first s tokens, which see them
           (information flows backwards in time there), as in LongLoRA. The sequence is padded to a multiple
           of g (padded keys never attended, padded query rows dropped), the roll is over the padded length.
  "roll-published": "roll" with LongLoRA's padding mask (train.py --as-published): every group of both halves
           gets a first group's block of the mask (in-group key i visible iff token i is real), so pad keys that
           wrap into the last group stay visible to the shifted heads' first half-group. Group j of sequence b
           gets sequence (b * n + j) mod B's block (torch's repeat tiles the batch; b's own when B = 1).
  "none":  no shifted half: every head attends inside [0, g), [g, 2g), ... (LongLoRA's "short attention"
           ablation; information never crosses a group boundary).
  Odd g: both shift directions use s = g // 2. (LongLoRA writes roll(-g // 2), which Python reads as
  -ceil(g / 2), but rolls back by g // 2; the two differ for odd g and would misalign the output by one
  token. LongLoRA only ever uses even g, where both readings agree.)

key_padding_mask: bool (B, Tk), True = real token. Padding keys are never attended. A query that sees
no key at all (e.g. a left-padding position) gets an output of 0 instead of NaN.
"""
import torch
import torch.nn.functional as F

S2_SHIFTS = ("segment", "roll", "none", "roll-published")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention. q (B, H, Tq, D), k/v (B, Hkv, Tk, D), Tq <= Tk. Returns (B, H, Tq, D)."""
    n_queries, n_keys = q.shape[2], k.shape[2]
    if n_queries > n_keys:
        raise ValueError(f"attention: {n_queries} queries but only {n_keys} keys (queries must be the last keys)")
    _check_padding_mask(key_padding_mask, q.shape[0], n_keys)
    k, v = _match_kv_heads(q, k, v)

    if key_padding_mask is None:
        if n_queries == n_keys:
            # The fused kernels build the causal pattern themselves: no T x T tensor in memory.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if n_queries == 1:
            return F.scaled_dot_product_attention(q, k, v)  # the newest token sees every cached key
        # SDPA's is_causal aligns top-left when Tq != Tk, so the KV-cache case needs an explicit mask.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(n_queries, n_keys, q.device))

    allowed = causal_mask(n_queries, n_keys, q.device) & key_padding_mask[:, None, None, :]
    return masked_attention(q, k, v, allowed)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int, shift: str = "segment",
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Shifted Sparse Attention. q (B, H, T, D), k/v (B, Hkv, T, D). Returns (B, H, T, D)."""
    if shift not in S2_SHIFTS:
        raise ValueError(f"s2_attention: shift must be 'segment', 'roll' or 'none' (or roll-published), got {shift!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"s2_attention: group_size must be a positive integer, got {group_size!r}")
    batch, n_heads, length, _ = q.shape
    if k.shape[2] != length:
        raise ValueError(f"s2_attention: queries and keys must have the same length, got {length} and {k.shape[2]}")
    _check_padding_mask(key_padding_mask, batch, length)
    if not shift.startswith("roll") and group_size >= length:
        return causal_attention(q, k, v, key_padding_mask)

    # Repeat kv heads first so that splitting the heads in halves keeps every query head with its kv head.
    k, v = _match_kv_heads(q, k, v)
    if shift == "none":
        return grouped_causal_attention(q, k, v, group_size, key_padding_mask)
    half = n_heads // 2  # LongLoRA shifts heads [H // 2, H)
    shifted_attention = _segment_shifted_attention if shift == "segment" else _roll_shifted_attention
    plain_mask = shifted_mask = key_padding_mask
    if shift == "roll-published" and key_padding_mask is not None:
        # First groups' masks, tiled; the shifted half's rolled right by s, so that the roll left undoes it.
        first = F.pad(key_padding_mask[:, :group_size], (0, max(0, group_size - length)), value=False)
        n = -(-length // group_size)
        source = (torch.arange(batch, device=q.device)[:, None] * n + torch.arange(n, device=q.device)) % batch
        tiled = first[source].reshape(batch, -1)
        plain_mask, shifted_mask = tiled[:, :length], torch.roll(tiled, group_size // 2, dims=1)[:, :length]
    outs = []
    if half > 0:
        outs.append(grouped_causal_attention(q[:, :half], k[:, :half], v[:, :half], group_size, plain_mask))
    outs.append(shifted_attention(q[:, half:], k[:, half:], v[:, half:], group_size, shifted_mask))
    # Joined in (B, T, H, D) memory order, as SDPA lays out its own output: the caller's (B, T, H * D) view of
    # it is then free instead of one more copy.
    return torch.cat([o.transpose(1, 2) for o in outs], dim=2).transpose(1, 2)


def grouped_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention inside consecutive groups [0, g), [g, 2g), ... of (B, H, T, D) tensors (equal heads).

    T not a multiple of g: the last group is shorter and attended on its own. (Zero padding to a multiple of
    g would give the same result, causality hiding the padding from every real query, but costs a copy of
    q, k and v that SDPA then keeps for backward.) key_mask: optional bool (B, T), True = key may be attended.
    """
    batch, _, length, _ = q.shape
    full = length // group_size * group_size
    if 0 < full < length:
        parts = [(slice(None, full), group_size), (slice(full, None), length - full)]
        return torch.cat([grouped_causal_attention(q[:, :, part], k[:, :, part], v[:, :, part], size,
                                                   None if key_mask is None else key_mask[:, part])
                          for part, size in parts], dim=2)
    group_size = min(group_size, length)
    padded = -(-length // group_size) * group_size
    q, k, v = (_to_groups(_pad_sequence(x, padded), group_size) for x in (q, k, v))
    if key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        key_mask = F.pad(key_mask, (0, padded - length), value=False).reshape(-1, 1, 1, group_size)
        allowed = causal_mask(group_size, group_size, q.device) & key_mask  # (B*n, 1, g, g): O(T * g)
        out = masked_attention(q, k, v, allowed)
    return _from_groups(out, batch)[:, :, :length]


def _segment_shifted_attention(q, k, v, group_size, key_mask):
    """Shifted half, segment mode: [0, s) on its own, then groups of g starting at s."""
    shift = group_size // 2
    if shift == 0:  # g == 1: every token is its own group, shifted or not
        return grouped_causal_attention(q, k, v, group_size, key_mask)
    head = [x[:, :, :shift] for x in (q, k, v)]
    tail = [x[:, :, shift:] for x in (q, k, v)]
    head_mask = None if key_mask is None else key_mask[:, :shift]
    tail_mask = None if key_mask is None else key_mask[:, shift:]
    outs = [grouped_causal_attention(*head, shift, head_mask)]
    if tail[0].shape[2] > 0:
        outs.append(grouped_causal_attention(*tail, group_size, tail_mask))
    return torch.cat(outs, dim=2)


# --------------------------------------------------------------------------- the roll variant

def _roll_shifted_attention(q, k, v, group_size, key_mask):
    """Shifted half, roll mode (LongLoRA): roll left by s, attend inside groups, roll back by s."""
    batch, _, length, _ = q.shape
    shift = group_size // 2
    padded = -(-length // group_size) * group_size
    if padded != length and key_mask is None:
        # After the roll the padding is no longer at the end of its group, so it must be masked.
        key_mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        key_mask = torch.roll(F.pad(key_mask, (0, padded - length), value=False), -shift, dims=1)
    q, k, v = (torch.roll(_pad_sequence(x, padded), -shift, dims=2) for x in (q, k, v))
    out = grouped_causal_attention(q, k, v, group_size, key_mask)
    return torch.roll(out, shift, dims=2)[:, :, :length]


# --------------------------------------------------------------------------- helpers

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D); kv head j serves query heads j*n_rep .. j*n_rep + n_rep-1."""
    if n_rep == 1:
        return x
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)


def _match_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give k and v as many heads as q (GQA); the head counts must divide."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads % n_kv_heads or k.shape[1] != v.shape[1]:
        raise ValueError(f"attention: {n_heads} query heads cannot share {n_kv_heads} key / {v.shape[1]} value heads")
    return repeat_kv(k, n_heads // n_kv_heads), repeat_kv(v, n_heads // n_kv_heads)


def _check_padding_mask(key_padding_mask: torch.Tensor | None, batch: int, length: int) -> None:
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (batch, length)):
        raise ValueError(
            f"attention: key_padding_mask must be a bool tensor of shape ({batch}, {length}), "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """SDPA with a boolean mask `allowed` (broadcastable to (B, H, Tq, Tk)); rows with no allowed key give 0.

    A fully masked row would make the softmax 0/0 = NaN (and NaN gradients); we let such rows see
    every key instead and zero their output, which also zeroes their gradient.
    """
    sees_something = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~sees_something)
    return out.masked_fill(~sees_something, 0.0)


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j is visible to query i at position Tk - Tq + i (bottom-right aligned)."""
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= query_pos[:, None]


def _pad_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad (B, H, T, D) at the end of the sequence axis to `length` (x itself when there is nothing to pad:
    F.pad would copy it anyway, and SDPA would keep that copy for backward)."""
    return x if length == x.shape[2] else F.pad(x, (0, 0, 0, length - x.shape[2]))


def _to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, n*g, D) -> (B*n, H, g, D): each group becomes its own batch entry."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // group_size, group_size, d).transpose(1, 2).reshape(-1, h, group_size, d)


def _from_groups(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*n, H, g, D) -> (B, H, n*g, D), inverse of _to_groups."""
    bn, h, g, d = x.shape
    return x.reshape(batch, bn // batch, h, g, d).transpose(1, 2).reshape(batch, h, -1, d)
