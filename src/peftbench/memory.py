"""The memory planner: a GPU memory budget as an input.

For a run with a budget (`gpu_memory: 24GB`), the allocator is capped to the budget (less what the CUDA
context holds outside it), so "fits in 24 GB" is what happened; then a few training steps at the run's
longest batch shape (two micro-steps each where the batch is accumulated: the second's forward runs beside
the first's gradients) are probed at falling micro-batches, first without and then (`gradient_checkpointing:
auto`) with gradient checkpointing, and the first that fits under the budget with a margin is kept. The
effective batch stays `batch_size` through gradient accumulation. The search itself is `plan_micro_batch`,
over any probe: the real one (`train.Recipe.probe`) measures peak reserved memory, the tests pass a fake.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .devices import cuda_index, outside_allocator
from .errors import SkipRun, UserError

GiB = 2**30
# Share of the budget a probe's peak may use: the rest absorbs fragmentation over a run's other shapes.
MARGIN = 0.05
CARD_SIZES_GB = (16, 24, 40, 48, 80, 141)
_UNITS = {
    "tb": 2**40,
    "t": 2**40,
    "gb": GiB,
    "g": GiB,
    "gib": GiB,
    "mb": 2**20,
    "m": 2**20,
    "mib": 2**20,
    "kb": 2**10,
    None: 2**20,
}


def parse_size(text, what: str) -> int:
    """Bytes in a size like 24GB, 24 GiB or 500MB (GB as cards are sold: 2^30 bytes; a bare number is MB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text * 2**20)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)?\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{what}: give a size like 24GB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class Fit:
    """The outcome of a memory plan: the micro-batch and checkpointing chosen, or None where nothing fit."""

    budget_mb: float
    micro_batch_size: int | None = None
    gradient_checkpointing: bool | None = None
    peak_reserved_mb: float | None = None
    step_seconds: float | None = None
    tried: list[dict] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.micro_batch_size is not None

    def needed(self) -> str:
        """What a run that does not fit was seen to need, in words."""
        last = self.tried[-1] if self.tried else {}
        if last.get("peak_reserved_mb") is not None:
            return f"{last['peak_reserved_mb'] / 1024:.1f} GB at micro-batch 1"
        return f"more than {self.budget_mb / 1024:.1f} GB at micro-batch 1 (out of memory under the cap)"

    def as_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def bf16_weights_hint(optimizer: str, trainable: int) -> str:
    """For a run that does not fit: what `optimizer: adamw_bf16` would save where the trained weights are
    large enough to matter (1 GB or more): 10 bytes per trained weight (weight, gradient, two moments and
    the Kahan buffer in bf16) instead of fused AdamW's 16 in fp32."""
    saving = 6 * trainable / 2**30
    if optimizer != "adamw" or saving < 1:
        return ""
    return f"; train.optimizer: adamw_bf16 would hold its trained weights in {saving:.1f} GB less"


def micro_batches(batch_size: int) -> list[int]:
    """The micro-batches tried, largest first: batch_size, halved down to 1."""
    out = [batch_size]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def plan_micro_batch(
    probe: Callable[[int, bool], tuple[float | None, float | None]],
    batch_size: int,
    checkpointing: bool | str,
    budget_bytes: int,
) -> Fit:
    """The largest micro-batch whose probe peak fits under the budget with the margin.

    `probe(micro_batch, checkpointing)` returns (peak reserved bytes, seconds per micro-step), with a peak of
    None when the probe ran out of memory. Without checkpointing first: it costs a recomputed forward pass,
    so it is turned on only when that is what it takes to fit (`checkpointing` "auto").
    """
    modes = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    fit = Fit(budget_mb=budget_bytes / 2**20)
    for ckpt in modes:
        for mb in micro_batches(batch_size):
            peak, seconds = probe(mb, ckpt)
            fit.tried.append(
                {
                    "micro_batch_size": mb,
                    "gradient_checkpointing": ckpt,
                    "peak_reserved_mb": None if peak is None else peak / 2**20,
                    "outcome": "out of memory"
                    if peak is None
                    else ("fits" if peak <= budget_bytes * (1 - MARGIN) else "over the margin"),
                }
            )
            if peak is not None and peak <= budget_bytes * (1 - MARGIN):
                fit.micro_batch_size, fit.gradient_checkpointing = mb, ckpt
                fit.peak_reserved_mb, fit.step_seconds = peak / 2**20, seconds
                return fit
    return fit


def cap_allocator(budget_bytes: int, device: str) -> dict:
    """Cap this process's CUDA allocator so that the device's own figure stays within the budget; returns
    what was set. Raises UserError when the budget exceeds the card, SkipRun when the CUDA context and
    libraries alone fill it."""
    import torch

    device = torch.device("cuda", cuda_index(device))
    _, total = torch.cuda.mem_get_info(device)
    if budget_bytes > total:
        raise UserError(
            f"gpu_memory {budget_bytes / GiB:.1f} GB is more than this GPU has ({total / GiB:.1f} GB); "
            "lower it or leave it out"
        )
    # This process's CUDA context and libraries count against the budget; other processes' memory does
    # not where NVML can tell them apart (each run of a parallel study gets the whole budget).
    outside, scope = outside_allocator(str(device))
    if budget_bytes <= outside:
        raise SkipRun(
            f"does not fit in {budget_bytes / GiB:.1f} GB: the CUDA context and libraries alone hold "
            f"{outside / GiB:.1f} GB"
        )
    fraction = (budget_bytes - outside) / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    # Segments that grow in place: under a cap, a run's many batch shapes otherwise fragment the cache
    # past what the probe saw at the longest shape (1.36B full fine-tuning under 24 GB ran out of memory
    # with 1.5 GB reserved but free, benchmarks/results/h200-scale-1.4b.json).
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return {
        "budget_mb": budget_bytes / 2**20,
        "allocator_cap_mb": fraction * total / 2**20,
        "outside_allocator_mb": outside / 2**20,
        "outside_allocator_scope": scope,
    }


def fits_on(peak_device_mb: float | None) -> str:
    """The smallest common card size that holds a run's device peak (with the margin), e.g. '24 GB'."""
    if peak_device_mb is None:
        return "-"
    for gb in CARD_SIZES_GB:
        if peak_device_mb <= gb * 1024 * (1 - MARGIN):
            return f"{gb} GB"
    return f"> {CARD_SIZES_GB[-1]} GB"
