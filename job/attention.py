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
"""

from __future__ import annotations

import inspect

NAME = "sdpa_varlen"
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
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
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

    packed = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no KV cache: training or a single prefill
        and not (dropout and module.training)  # the kernels below do no attention dropout
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:  # neither kernel below caps the attention logits
        raise ValueError(
            f"{NAME} does not cap attention logits ({type(module).__name__} asks for softcap="
            f"{kwargs['softcap']}); load the model with attention_for(config) (job/model.py does)"
        )
    window = kwargs.get("sliding_window")  # set on the sliding-window layers of Gemma 2/3 and Mistral
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
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
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)
    else:
        out = _per_conversation(q, k, v, cu, scaling, window)
    return out.unsqueeze(0), None


def attention_for(config, wanted: str) -> tuple[str, str | None]:
    """The attention implementation to load a model with, and why it differs from `wanted` (None: it does not).

    Gemma 2 caps its attention logits (attn_logit_softcapping), which neither sdpa nor the varlen kernel does:
    Transformers' eager attention is the one that computes that model as it was trained.
    """
    text = getattr(config, "text_config", None) or config
    if getattr(text, "attn_logit_softcapping", None) is not None and wanted != "eager":
        return "eager", (
            f"{type(config).__name__} caps its attention logits (attn_logit_softcapping="
            f"{text.attn_logit_softcapping}), which only eager attention computes: using eager instead of {wanted}"
        )
    return wanted, None


def register() -> None:
    """Make ATTN_IMPLEMENTATION='sdpa_varlen' known to Transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    global _FLASH
    _FLASH = _flash_varlen()
    AttentionInterface.register(NAME, varlen_attention_forward)
    # Same masks as sdpa: the fallback needs them; the packed path ignores them.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
