"""Padding-free attention for packed rows: each conversation attends only to itself, at flash speed.

Why our own (the one attention function in the project): with PACKING, TRL flattens a micro-batch
into one row of up to BATCH_SIZE x MAX_SEQ_LENGTH tokens and passes the conversation boundaries as
`cu_seq_lens_q`. Transformers' "sdpa" turns that row into a dense block-diagonal mask (4,096 x 4,096
per micro-batch) and its kernel computes every masked-out block: about 4,096 / 254 = 16 times the
attention work at the mean conversation length. Transformers' varlen path ("flash_attention_2") needs the flash-attn
package, which has no wheels for our torch. PyTorch ships the same FlashAttention-2 varlen kernel as
`torch.nn.attention.varlen.varlen_attn`; we register it with Transformers' AttentionInterface as
ATTN_IMPLEMENTATION="sdpa_varlen". Everything that is not a packed row (padded batches, generation
with a KV cache) goes to Transformers' own sdpa, with the mask sdpa builds; on CPU, packed rows take
a per-conversation sdpa loop. bench/throughput.py measures it against sdpa (recipe job-sdpa).

Models that cap their attention logits (Gemma 2's attn_logit_softcapping) compute correctly only with
Transformers' eager attention, which neither kernel above replaces. Given a packed row, eager attention
computes and keeps for backward dense scores over the whole row: 8 x 512 tokens squared per head, 8 times
what the same conversations padded need (the bench measured Gemma 2's packed step at 2.3x the padded
path's peak memory). ATTN_IMPLEMENTATION="sdpa_varlen" therefore loads such a model with EAGER_NAME:
the model's own eager function, called on each conversation of a packed row with that conversation's
causal (or sliding-window) mask, and as it is on everything else.
"""

from __future__ import annotations

import inspect

NAME = "sdpa_varlen"
# Packed rows of a model that caps its attention logits: its own eager attention, one conversation at a time.
EAGER_NAME = "eager_varlen"
# torch's varlen flash kernel and the keyword names this torch version takes; set by register(),
# outside any compiled region (torch.compile traces the forward below, not this lookup).
_FLASH = None


def _flash_varlen():
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return None  # FlashAttention-2 needs an Ampere GPU or newer: a T4 or V100 takes the reference path
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_varlen() -> bool:
    """Whether packed rows go through the flash kernel here (else the per-conversation loop, which reads the
    conversation bounds on the host and so cannot be captured in a CUDA graph)."""
    return _flash_varlen() is not None


# The last packed row's conversation bounds, read once on the host: every layer of a forward gets the same
# cu_seq_lens tensor, and reading a GPU tensor waits for the GPU (one wait per forward instead of one per layer).
_BOUNDS: tuple = (None, [])


def _bounds(cu) -> list[tuple[int, int]]:
    """(start, end) of each conversation of a packed row, from its cumulative lengths `cu` (a tensor)."""
    global _BOUNDS
    if _BOUNDS[0] is not cu:  # held, so no other tensor can take its identity while cached
        edges = cu.tolist()
        _BOUNDS = (cu, list(zip(edges[:-1], edges[1:])))
    return _BOUNDS[1]


def _is_packed(module, query, key, cu_seq_lens_q, dropout: float) -> bool:
    """Whether this call attends a packed row: one row with conversation bounds, no KV cache (training or a single
    prefill); `dropout`: whether dropout is applied here (the kernels of varlen_attention_forward have none)."""
    return (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and not (dropout and module.training)
    )


def _per_conversation(q, k, v, cu, scale, window: int | None = None):
    """Reference path (CPU, or a torch without varlen_attn): causal sdpa on each conversation.

    q: (tokens, heads, dim); k, v: (tokens, kv_heads, dim). `window`: a sliding-window layer's size (Gemma 2/3,
    Mistral): a token sees itself and the window - 1 tokens before it, as Transformers' sliding mask does. Same
    numbers as the flash kernel up to float rounding; used by the CPU tests to check the packed path against
    the padded one.
    """
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    out = []
    for start, end in _bounds(cu):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        if window is not None and end - start > window:
            i = torch.arange(end - start, device=q.device)
            seen = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seen, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out, 0)


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q=None,
    max_length_q: int | None = None,
    **kwargs,
):
    """Transformers attention interface: query (batch, heads, q_len, dim), key/value (batch, kv_heads,
    kv_len, dim); returns (batch, q_len, heads, dim) and no weights, like sdpa_attention_forward."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _is_packed(module, query, key, cu_seq_lens_q, dropout):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:  # neither kernel below caps the attention logits
        raise ValueError(
            f"{NAME} does not cap attention logits ({type(module).__name__} asks for softcap="
            f"{kwargs['softcap']}); load the model with attention_for(config) (job/model.py does: {EAGER_NAME})"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    cu = cu_seq_lens_q
    # Gemma's, Mistral's ... sliding-window layers pass their span: a query sees itself and window - 1 tokens
    # back (Transformers' sliding_window_overlay), flash's window_size=(window - 1, 0).
    window = kwargs.get("sliding_window")
    flash = _FLASH
    if flash is not None and q.is_cuda and q.dtype != torch.float32 and (window is None or "window_size" in flash[1]):
        varlen_attn, params = flash  # the flash kernels take 16-bit only
        # window_size=(left, right): a token sees `left` tokens before it (-1: all) and `right` after it
        left = -1 if window is None else window - 1
        causal = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                causal["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        # TRL passes the longest conversation as a Python int; under torch.compile it stays symbolic
        max_len = max_length_q if max_length_q is not None else int(cu.diff().max())
        cu = cu.to(device=q.device, dtype=torch.int32)
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)
    else:
        out = _per_conversation(q, k, v, cu, scaling, window)
    return out.unsqueeze(0), None


def _causal_mask(length: int, window: int | None, dtype, device):
    """Additive mask (1, 1, length, length) as eager attention takes it: 0 where a token may attend (itself and
    the tokens before it, at most `window` - 1 back on a sliding-window layer), the dtype's lowest value elsewhere
    (Transformers' eager_mask)."""
    import torch

    i = torch.arange(length, device=device)
    seen = i[:, None] >= i[None, :]
    if window is not None:
        seen &= i[:, None] - i[None, :] < window
    mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)
    return mask[None, None]


def eager_varlen_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """Transformers attention interface (shapes as varlen_attention_forward's): the model's own eager attention
    (the `eager_attention_forward` of its modeling module, which caps the logits), on each conversation of a packed
    row with its own causal mask; anything else straight to it, with the mask Transformers built for eager. Returns
    no attention weights for a packed row (the row's are not one matrix)."""
    import sys

    import torch

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{EAGER_NAME}: {type(module).__module__} has no eager_attention_forward to call")
    cu = kwargs.pop("cu_seq_lens_q", None)
    if not _is_packed(module, query, key, cu, dropout=0.0):  # eager applies dropout itself
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window")  # the eager function reads the window from the mask alone
    out = []
    for start, end in _bounds(cu):
        if end == start:  # an empty conversation (padding to a fixed shape) has nothing to attend
            continue
        mask = _causal_mask(end - start, window, query.dtype, query.device)
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        out.append(eager(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)[0])
    return torch.cat(out, 1), None  # (1, tokens, heads, dim)


def unpacked(implementation: str) -> str:
    """The attention for rows that are never packed (decoding, padded batches) of a model loaded with
    `implementation`: Transformers' eager for EAGER_NAME (the same capped attention), sdpa for anything else that
    is not one of those two (decoding passes 4D masks, which both take as they are)."""
    if implementation == EAGER_NAME:
        return "eager"
    return implementation if implementation in ("sdpa", "eager") else "sdpa"


def attention_for(config, wanted: str) -> tuple[str, str | None]:
    """The attention implementation to load a model with, and why it differs from `wanted` (None: it does not).

    Gemma 2 caps its attention logits (attn_logit_softcapping), which neither sdpa nor the varlen kernel does:
    Transformers' eager attention is the one that computes that model as it was trained; asked for NAME (packed
    rows), it gets EAGER_NAME, the same eager attention one conversation at a time.
    """
    text = getattr(config, "text_config", None) or config
    if getattr(text, "attn_logit_softcapping", None) is not None and wanted not in ("eager", EAGER_NAME):
        instead = EAGER_NAME if wanted == NAME else "eager"
        return instead, (
            f"{type(config).__name__} caps its attention logits (attn_logit_softcapping="
            f"{text.attn_logit_softcapping}), which only eager attention computes: using {instead} instead of "
            f"{wanted}" + (" (eager attention on each conversation of a packed row)" if instead == EAGER_NAME else "")
        )
    return wanted, None


def register() -> None:
    """Make ATTN_IMPLEMENTATION='sdpa_varlen' and EAGER_NAME known to Transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    global _FLASH
    _FLASH = _flash_varlen()
    AttentionInterface.register(NAME, varlen_attention_forward)
    # Same masks as sdpa: the fallback needs them; the packed path ignores them.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    AttentionInterface.register(EAGER_NAME, eager_varlen_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EAGER_NAME, eager_mask)  # for what is not a packed row
