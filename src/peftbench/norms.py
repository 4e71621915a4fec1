"""Layer norms in bf16 under bf16 autocast (`train.layer_norms`).

Autocast computes layer norms in fp32, so a BERT-style encoder's residual stream (each norm's output, added
to the next block's) stays fp32: every linear layer that reads it casts it to bf16 again, and its gradients
are added in fp32 (roberta-base: 0.9 ms of casts, 1.2 ms of fp32 norms and 0.8 ms of fp32 gradient adds in
a 14.6-ms graphed step on an H200, benchmarks/results/profiles/h200-roberta-full-weight-copies_profile.json).
`Bf16LayerNorm` takes and gives bf16 there, with fp32 statistics inside torch's kernel.
"""

from __future__ import annotations

import torch

from .errors import UserError


class Bf16LayerNorm(torch.nn.LayerNorm):
    """A `torch.nn.LayerNorm` (the same parameters, fp32 and trained) that under bf16 autocast takes and
    gives bf16; without it, the LayerNorm it was. One class for every norm of a model, so a compiler guards
    on the class, not on each norm."""

    def forward(self, x):
        kind = x.device.type
        if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16):
            return super().forward(x)
        weight, bias = (None if t is None else t.to(torch.bfloat16) for t in (self.weight, self.bias))
        with torch.autocast(kind, enabled=False):
            return torch.nn.functional.layer_norm(
                x.to(torch.bfloat16), self.normalized_shape, weight, bias, self.eps
            )


def bf16_layer_norms(model) -> int:
    """`model`'s layer norms (`torch.nn.LayerNorm`), in place, as `Bf16LayerNorm`s; returns how many.
    `fp32_layer_norms` undoes it."""
    norms = [m for m in model.modules() if type(m) is torch.nn.LayerNorm]
    for m in norms:
        m.__class__ = Bf16LayerNorm
    return len(norms)


def fp32_layer_norms(model) -> None:
    """`model`'s layer norms as autocast computes them (fp32 in and out), where `bf16_layer_norms` changed
    them."""
    for m in model.modules():
        if type(m) is Bf16LayerNorm:
            m.__class__ = torch.nn.LayerNorm


def chosen(choice: str | None) -> str:
    """The setting ("bf16" or "fp32") a run's `layer_norms` metric records (`choose_layer_norms`'s answer);
    None, a run from before the choice: "fp32"."""
    return "bf16" if choice and choice.startswith("bf16") else "fp32"


def choose_layer_norms(
    model, seqs, pad_id: int, device: str, max_len, setting: str, amp, probe_on_cpu: bool = False
) -> str:
    """`model`'s layer norms for training (`train.layer_norms`), applied in place: "bf16: N layer norms"
    (`bf16_layer_norms`) or "fp32: why not". `auto` keeps bf16 ones under bf16 autocast on CUDA where a
    probe shows they change the logits of three real items (the shortest, the median and the longest) by no
    more than 2% of the largest logit, or than twice autocast's own disagreement with itself, the items
    padded together against each alone; `bf16` insists; `fp32` never. On the CPU `auto` keeps fp32 ones
    (`probe_on_cpu`: as on CUDA): their speed there is unmeasured, and bf16 ones make a CPU run's gradients
    depend on its thread count (5e-5 against 3e-9 with fp32 ones, tiny BERT, 1 thread against 2), and runs
    on Ray's actors no longer repeated the local executor's losses exactly."""
    if setting == "fp32":
        return "fp32 (layer_norms: fp32)"
    if amp is not torch.bfloat16:
        if setting == "bf16":
            raise UserError(
                "train.layer_norms: bf16 needs bf16 autocast, which this run does not use; set "
                "precision: bf16, or layer_norms: auto"
            )
        return "fp32: no bf16 autocast"
    if setting == "auto" and not (device.startswith("cuda") or probe_on_cpu):
        return "fp32: auto uses bf16 layer norms on CUDA only"
    n = bf16_layer_norms(model)
    if not n:
        return "fp32: the model has no torch.nn.LayerNorm"
    gap = _gap(model, seqs, pad_id, device, max_len, amp) if setting == "auto" else None
    if gap:
        fp32_layer_norms(model)
        return f"fp32: {gap}"
    return f"bf16: {n} layer norms"


def _gap(model, seqs, pad_id: int, device: str, max_len, amp) -> str | None:
    """None where `model`'s logits with bf16 layer norms agree with its logits with fp32 ones
    (`batches.logits_gap`, as `choose_layer_norms` says), else how they differ."""
    from .batches import logits_gap, padded_logits, padded_reference, probe_items, probing

    pick = probe_items(seqs)
    with probing(model, device, amp):
        bf16 = padded_logits(model, pick, pad_id, device, max_len)
        fp32_layer_norms(model)
        ref, alone = padded_reference(model, pick, pad_id, device, max_len)
        bf16_layer_norms(model)
    gap = logits_gap(bf16, ref, alone, amp)
    if gap is None:
        return None
    return f"bf16 layer norms moved the logits by {gap[0]:.3g} (padded alone vs together: {gap[1]:.3g})"
