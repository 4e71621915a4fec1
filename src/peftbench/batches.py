"""Batches and forward passes: length-bucketed batches, collation, the attention-mask form a model takes,
one forward pass of a classifier (prefix tuning included), and evaluation in length-sorted batches.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from .devices import autocast

# Batches within a window of this many batches are sorted by length (transformers' length-grouped sampler).
GROUP_WINDOW = 50


def make_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group_by_length: bool
) -> list[np.ndarray]:
    """A random epoch of batches; with grouping, items of similar length share a batch (less padding).

    Grouping sorts within shuffled windows of 50 batches and then shuffles the batches, like
    transformers' length-grouped sampler: every item is still seen once per epoch in random company.
    """
    n = len(lengths)
    perm = rng.permutation(n)
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    window = batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, n, window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def steps_per_epoch(n: int, batch_size: int, group_by_length: bool) -> int:
    """How many batches `make_batches` makes of `n` items (windows end in a short batch each)."""
    if not group_by_length:
        return math.ceil(n / batch_size)
    window = batch_size * GROUP_WINDOW
    return sum(math.ceil(min(window, n - i) / batch_size) for i in range(0, n, window))


def pad_multiple(train, cuda: bool) -> int:
    """The padding granularity of a run's training batches (`train`: its TrainSettings). On the H200
    (benchmarks/results/h200-padding.json) eager multiples of 8 - many distinct shapes - ran 2.6-2.8x slower
    than multiples of 64 or fixed padding: there, each new shape costs more than the padding saves. With
    CUDA graphs too (h200-graphs-roberta-padding.json): each new shape costs a recording, and later epochs
    were as fast with multiples of 64 as of 16. On the CPU, compute-bound, fine buckets pay. max_length means
    fixed padding. A whole compiled model recompiles per shape: multiples of 64 there too (compiled blocks
    take every shape with one code)."""
    return train.pad_to_multiple_of or (64 if train.compiles_whole or cuda else 8)


def pad_width(longest: int, multiple: int, max_len: int | None = None) -> int:
    """The width a batch is padded to: its longest item's length rounded up to `multiple`, and not past
    `max_len` (unless an item is longer)."""
    width = int(math.ceil(longest / multiple) * multiple)
    return width if max_len is None else min(width, max(max_len, longest))


def collate(seqs: list[np.ndarray], pad_id: int, multiple: int = 8, max_len: int | None = None):
    """(input_ids, attention_mask) as int64 tensors padded to the longest item (rounded up to `multiple`)."""
    import torch

    if max_len is not None:
        seqs = [s[:max_len] for s in seqs]
    width = pad_width(max(len(s) for s in seqs), multiple, max_len)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def active_peft_config(model):
    cfgs = getattr(model, "peft_config", None)
    return cfgs.get(getattr(model, "active_adapter", "default")) if isinstance(cfgs, dict) else None


def prefix_length(model) -> int:
    """Number of prefix positions when `model` is a prefix-tuning PEFT model, else 0."""
    cfg = active_peft_config(model)
    return cfg.num_virtual_tokens if cfg is not None and str(cfg.peft_type).endswith("PREFIX_TUNING") else 0


def model_forward(model, ids, mask, mask_mode: str = "2d", labels=None):
    """One forward pass of the classifier on (ids, 2D padding mask; None: no padding).

    Prefix tuning is run here, as PEFT runs it (prefixes from `get_prompt` as the key/value cache, the mask
    extended over them), because PEFT's own forward looks for a `past_key_values` parameter that
    transformers 5.2x renamed to `cache` and then refuses ("Model does not support past key values").
    """
    n_prefix = prefix_length(model)
    kw = {"labels": labels} if labels is not None else {}
    if not n_prefix:
        return model(input_ids=ids, attention_mask=mask_for_model(mask, mask_mode), **kw)
    import torch

    base = model.base_model
    cache_arg = _cache_argument(type(base.get_submodule(model.transformer_backbone_name)))
    cache = model.get_prompt(batch_size=ids.shape[0])
    if mask is not None:
        mask = torch.cat([mask.new_ones(ids.shape[0], n_prefix), mask], dim=1)
    return base(input_ids=ids, attention_mask=mask, **{cache_arg: cache}, **kw)


@functools.cache
def _cache_argument(backbone_cls) -> str:
    """The key/value-cache argument of a backbone's forward: `cache` from transformers 5.2x on, before it
    `past_key_values` (read once per class, not on every training step)."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone_cls.forward).parameters else "past_key_values"


def mask_for_model(mask, mode: str):
    """The attention mask as the model gets it: the 2D padding mask, or (mode "4d-...") the 4D boolean mask
    transformers would build from it. A ready 4D mask skips transformers' check `padding_mask.all()`, a host
    synchronisation on every forward pass that stalls the GPU queue (measured in benchmarks/results)."""
    if mode == "2d":
        return mask
    import torch

    keep = mask.bool()[:, None, None, :]  # (batch, 1, 1, keys): attend to real tokens only
    if mode == "4d-causal":
        n = mask.shape[1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()[None, None]
    return keep


def choose_mask_mode(
    model,
    seqs: list[np.ndarray],
    pad_id: int,
    device: str,
    probe_on_cpu: bool = False,
    max_len: int | None = None,
    forced: str = "auto",
    amp=None,
) -> str:
    """Which attention-mask form this model takes without changing its output, checked on real inputs.

    On CUDA, a 4D mask (bidirectional for encoders, causal for decoders) is used when the model's logits with
    it equal those with the plain 2D mask on a padded batch; any difference or error keeps the 2D mask (eager
    attention that adds masks, prompt methods that extend the mask, architectures with their own masking).
    On the CPU the synchronisation costs nothing: always 2D. `forced` (train.attention_mask) skips the probe.
    The probe runs under the run's autocast (`amp`): a bf16 base with fp32 adapters and head runs only so.
    """
    if forced != "auto":
        return forced
    if (not device.startswith("cuda") and not probe_on_cpu) or len(seqs) < 2 or prefix_length(model):
        return "2d"
    pick = probe_items(seqs)
    if len({len(s) for s in pick}) == 1:
        return "2d"
    # Full length (local-attention windows must show up), within the run's limit (soft prompts take
    # positions).
    ids, mask = collate(pick, pad_id, multiple=8, max_len=max_len)
    try:  # any failure here only means: keep the 2D mask
        with probing(model, device, amp):
            return _first_equal_mask_mode(model, ids.to(device), mask.to(device))
    except Exception:
        return "2d"


def probe_items(seqs: list[np.ndarray]) -> list[np.ndarray]:
    """The shortest, the median and the longest item of a split: what the forward-path probes check."""
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    order = np.argsort(lengths, kind="stable")
    return [seqs[order[0]], seqs[order[len(order) // 2]], seqs[order[-1]]]


@contextlib.contextmanager
def probing(model, device: str, amp):
    """`model` in eval mode, under the run's autocast (`amp`) and without autograd, for a forward-path
    probe; its training mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, amp):
            yield
    finally:
        model.train(was_training)


def padded_logits(model, items: list[np.ndarray], pad_id: int, device: str, max_len=None):
    """The fp32 logits of `items` padded together (2D mask): the reference the forward-path probes compare
    a changed forward with."""
    ids, mask = collate(items, pad_id, multiple=8, max_len=max_len)
    return model_forward(model, ids.to(device), mask.to(device)).logits.float()


def padded_reference(model, items: list[np.ndarray], pad_id: int, device: str, max_len=None):
    """(`items` padded together, each padded alone): the reference logits and the padded path's own
    disagreement with itself, as `logits_gap` takes them."""
    import torch

    together = padded_logits(model, items, pad_id, device, max_len)
    return together, torch.cat([padded_logits(model, [s], pad_id, device, max_len) for s in items])


def logits_gap(out, ref, alone, amp) -> tuple[float, float] | None:
    """None where logits `out` agree with the padded `ref`, else (how far they differ, the padded path's own
    disagreement). "Agree": within a relative tolerance (1e-3 in fp32, 2e-2 under autocast, of the largest
    logit), or within twice the padded path's own disagreement with itself, `alone` (each item padded alone)
    against `ref` (a deep bf16 model's kernels differ by more than any fixed tolerance; a changed forward
    that is wrong differs by far more)."""
    tol = (2e-2 if amp is not None else 1e-3) * float(ref.abs().max())
    noise = float((alone - ref).abs().max())
    diff = float((out.float() - ref).abs().max())
    return None if diff <= max(tol, 2 * noise) else (diff, noise)


def _first_equal_mask_mode(model, ids, mask) -> str:
    import torch

    with torch.inference_mode():
        ref = model_forward(model, ids, mask).logits
        # Under bf16 autocast the two forms differ in their last bits between kernels.
        tol = 1e-3 if not torch.is_autocast_enabled(ids.device.type) else 2e-2
        for mode in ("4d-bidirectional", "4d-causal"):
            try:
                out = model_forward(model, ids, mask, mode).logits
            except Exception:
                continue
            if out.shape == ref.shape and torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol):
                return mode
    return "2d"


def eval_batches(seqs: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """The evaluation batches: item indices sorted by length (longest first), `batch_size` at a time."""
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def predict_logits(
    model,
    seqs: list[np.ndarray],
    batch_size: int,
    device: str,
    amp,
    pad_id: int,
    max_len: int | None = None,
    mask_mode: str = "2d",
    batches: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Logits for `seqs`, evaluated in length-sorted batches (little padding), returned in input order; with
    `batches` (some of `eval_batches`), those batches only, as they were evaluated, in their order.

    On CUDA, widths are rounded to multiples of 64: every new shape costs kernel selection, more than the
    padding saves (benchmarks/results/h200-padding.json)."""
    import torch

    multiple = 64 if device.startswith("cuda") else 8
    chosen = eval_batches(seqs, batch_size) if batches is None else batches
    model.eval()
    chunks = []
    with (
        torch.inference_mode(),
        autocast(device, amp),
    ):
        for idx in chosen:
            ids, mask = collate([seqs[j] for j in idx], pad_id, multiple=multiple, max_len=max_len)
            logits = model_forward(
                model, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), mask_mode
            ).logits
            chunks.append((idx, logits.float()))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    if batches is not None:
        return torch.cat([lg for _, lg in chunks]).cpu().numpy()
    out = np.empty((len(seqs), chunks[0][1].shape[-1]), dtype=np.float32)
    for idx, logits in chunks:
        out[idx] = logits.cpu().numpy()
    return out
