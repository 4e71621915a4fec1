"""Padding-free training batches: a batch's sequences packed back to back in one row, attention confined to
each sequence, positions restarting per sequence, and each sequence's classification position (the first
token for encoders, the last for decoders) gathered for the head.

The backbone and head are the model's own modules (adapters included); only attention is swapped, for the
packed call alone, to `packed_attention` (registered in transformers' attention interface): on CUDA,
SDPA over nested jagged tensors (FlashAttention with the sequence offsets, attention dropout included);
elsewhere SDPA with a block-diagonal mask. The loss is transformers' own for sequence classification.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .batches import pad_width

ATTENTION = "peftbench_packed"

# Encoders' heads by model_type. A head takes the gathered hidden states as (sequences, 1, hidden), the shape
# whose position 0 its pooler or classifier reads. Decoders' head is their `score` layer.
ENCODER_HEADS = {
    "bert": lambda m, h: m.classifier(m.dropout(m.bert.pooler(h))),
    "roberta": lambda m, h: m.classifier(h),
    "xlm-roberta": lambda m, h: m.classifier(h),
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
# `auto` packs where packed rows hold at least this much fewer tokens than padded batches. On the H200,
# length-grouped IMDb batches of 16 (11.5% padding) trained 4% slower packed, saving 4% of the tokens
# (benchmarks/results/h200-packing.json): the saving must outweigh packed attention's and the extra
# shapes' costs.
MIN_SAVING = 0.10


def architecture(model):
    """(backbone, head, causal, position offset) of a supported classifier, or a reason string."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(base.config, "model_type", None)
    if kind in ENCODER_HEADS:
        # RoBERTa's positions start after its padding index
        offset = base.config.pad_token_id + 1 if kind != "bert" else 0
        return getattr(base, base.base_model_prefix), ENCODER_HEADS[kind], False, offset
    if kind in DECODERS:
        return base.model, lambda m, h: m.score(h)[:, 0], True, 0
    return f"not built for {kind or type(base).__name__} models (BERT, RoBERTa, Llama, Mistral, Qwen are)"


def pack(seqs: list[np.ndarray], pad_id: int, multiple: int, max_len: int | None, last: bool):
    """(ids, positions, offsets, segments, picks) for one packed row of `seqs`, as int64 CPU tensors.

    The row is padded to a multiple of `multiple` (few shapes, few CUDA graphs) and always ends in at least
    one padding token, its own segment that nobody attends to nor reads, at position 0: every batch of n
    sequences has n + 2 offsets. `picks` are the classification positions (each sequence's first token, or
    last with `last`)."""
    import torch

    if max_len is not None:
        seqs = [s[:max_len] for s in seqs]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    total = int(lengths.sum())
    width = pad_width(total + 1, multiple)
    ids = np.full(width, pad_id, dtype=np.int64)
    ids[:total] = np.concatenate(seqs)
    offsets = np.concatenate([[0], np.cumsum(lengths), [width]])
    segments = np.repeat(np.arange(len(seqs) + 1), np.diff(offsets))
    positions = np.arange(width) - offsets[segments]
    positions[total:] = 0  # the tail is no sequence: a long one would pass the model's position table
    picks = offsets[1:-1] - 1 if last else offsets[:-2]
    return tuple(torch.from_numpy(np.ascontiguousarray(x))[None] for x in (ids, positions)) + tuple(
        torch.from_numpy(np.ascontiguousarray(x)) for x in (offsets, segments, picks)
    )


def packed_forward(model, arch, ids, positions, offsets, segments, picks, max_seqlen: int, labels=None):
    """(loss or None, logits) of a packed batch: the backbone over the row, the head over the picks."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    backbone, head, _, offset = arch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    info = {"offsets": offsets, "segments": segments, "max_seqlen": max_seqlen}
    with _attention(base.config):
        hidden = backbone(input_ids=ids, position_ids=positions + offset, packing=info).last_hidden_state
    logits = head(base, hidden[0, picks][:, None])
    loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, base.config)
    return loss, logits


@contextlib.contextmanager
def _attention(config):
    """Packed attention for the duration of one call (the model's own attention everywhere else)."""
    _register()
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, packed_attention)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packing=None, **_):
    """Attention within each packed sequence. query/key/value: (1, heads, tokens, head_dim); returns
    (1, tokens, heads, head_dim), as transformers' SDPA attention does. Grouped key/value heads are repeated
    to the query heads."""
    import torch
    import torch.nn.functional as F

    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, head_dim)
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    causal = bool(getattr(module, "is_causal", False))
    if q.is_cuda:
        offsets, longest = packing["offsets"], packing["max_seqlen"]

        def jagged(x):
            return torch.nested.nested_tensor_from_jagged(
                x, offsets, min_seqlen=1, max_seqlen=longest
            ).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            jagged(q), jagged(k), jagged(v), dropout_p=dropout, is_causal=causal, scale=scaling
        )
        return out.transpose(1, 2).values()[None], None
    seg = packing["segments"]
    keep = seg[:, None] == seg[None, :]
    if causal:
        keep = keep & torch.ones_like(keep).tril()
    out = F.scaled_dot_product_attention(
        *(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=keep, dropout_p=dropout, scale=scaling
    )
    return out[0].transpose(0, 1)[None], None


def batch_tokens(lengths: np.ndarray, multiple: int, packed: bool) -> int:
    """Tokens one (micro-)batch of these lengths computes: one packed row (its padding tail included), or
    every item padded to the longest, each rounded up to `multiple`."""
    if packed:
        return pad_width(int(lengths.sum()) + 1, multiple)
    return len(lengths) * pad_width(int(lengths.max()), multiple)


def token_saving(lengths: np.ndarray, parts: list[np.ndarray], pad_multiple: int, pack_multiple: int):
    """The share of the tokens of padded (micro-)batches `parts` that packing them would not compute."""
    padded = sum(batch_tokens(lengths[b], pad_multiple, packed=False) for b in parts)
    packed = sum(batch_tokens(lengths[b], pack_multiple, packed=True) for b in parts)
    return 1.0 - packed / padded if padded else 0.0


def eager_reason(setting, graphs_off: str | None) -> str | None:
    """Why `auto` does not pack a run whose steps are not replayed from CUDA graphs (None: it packs).

    Eager, the nested tensors' per-layer host work outweighs the padding saved: on the 8B shape packed LoRA
    trained 26.0 samples/s against 42.1 padded at micro-batch 16, and 3.7 against 13.9 at micro-batch 2
    (benchmarks/results/h200-packing-8b.json)."""
    if setting == "auto" and graphs_off is not None:
        return f"auto packs graphed steps only; these are not ({graphs_off})"
    return None


def choose(model, seqs, pad_id: int, device: str, max_len, setting, amp, blocker: str | None, saving: float):
    """(architecture, None) where this run trains on packed batches, else (None, why not).

    `auto` packs on CUDA where the model is a supported classifier, packing saves at least MIN_SAVING of
    the tokens (`saving`) and its packed logits equal its padded ones on three real items (the shortest,
    the median and the longest), under the run's autocast; `true` insists (an unsupported model or a
    mismatch is an error); `false` never packs."""
    from .errors import UserError

    if setting is False:
        return None, "off (packing: false)"
    arch = blocker or architecture(model)
    if isinstance(arch, str) or (setting == "auto" and not device.startswith("cuda")):
        why = arch if isinstance(arch, str) else "auto packs on CUDA only"
        if setting is True and isinstance(arch, str):
            raise UserError(f"packing: true, but {arch}; set packing: auto or false")
        return None, why
    if setting == "auto" and saving < MIN_SAVING:
        return None, f"saves {saving:.1%} of the padded tokens (auto packs from {MIN_SAVING:.0%})"
    gap = _probe(model, arch, seqs, pad_id, device, max_len, amp)
    if gap is None:
        return arch, None
    if setting is True:
        raise UserError(f"packing: true, but {gap}; set packing: auto or false")
    return None, gap


def _probe(model, arch, seqs, pad_id, device, max_len, amp) -> str | None:
    """None when packed logits agree with padded ones on three real items (`batches.logits_gap`), else how
    they differ."""
    from .batches import logits_gap, padded_reference, probe_items, probing

    pick = probe_items(seqs)
    try:
        with probing(model, device, amp):
            ref, alone = padded_reference(model, pick, pad_id, device, max_len)
            packed = pack(pick, pad_id, 64, max_len, last=arch[2])
            longest = max(len(s) for s in pick)
            out = packed_forward(model, arch, *(x.to(device) for x in packed), max_seqlen=max(longest, 64))
    except Exception as e:
        return f"packed forward failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    gap = logits_gap(out[1], ref, alone, amp)
    if gap is None:
        return None
    return f"packed logits differ from padded ones by {gap[0]:.3g} (padded alone vs together: {gap[1]:.3g})"
