"""GPU memory without a GPU: what `peftbench plan --gpu-memory 24GB` answers on a machine that has none.

The model is built from its config on the meta device (every weight's shape and dtype, none read), its
forward pass runs there at the probe's shape, and every tensor autograd keeps for the backward pass is
counted. The micro-batch search is the probe's own (`memory.plan_micro_batch`) over this estimate. Checked
against the peaks measured on an H200 (README, "Memory: what fits on which card").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import PreTrainedModel

from . import methods as registry
from .batches import model_forward
from .memory import GiB, bf16_weights_hint, plan_micro_batch
from .models import meta_model
from .spec import RunSpec

CONTEXT_BYTES = GiB  # the CUDA context and libraries, outside the allocator (0.61 GB on an H200, torch 2.11)
# The backward pass's activation gradients and temporaries, as a share of the saved activations: what the
# plain loop's LoRA, QLoRA and IA3 peaks on an H200 held beyond weights, optimizer state and saved
# activations, 8-22% at micro-batches 2 and 16 (the 8B and 1.4B shapes of benchmarks/scale.py)
BACKWARD_SHARE = 0.10
# What the caching allocator reserves beyond the allocated peak: 2-7% in the same runs (more where CUDA
# graphs' memory pools are added at small micro-batches: not estimated)
RESERVE_SHARE = 0.05
# Optimizer state per trained weight, as `train.make_optimizer`'s optimizers hold it: two fp32 moments; two
# bf16 moments and a bf16 Kahan buffer (optimi); two 8-bit moments (bitsandbytes).
STATE_BYTES = {"adamw": 8, "adamw_bf16": 6, "adamw_8bit": 2, "paged_adamw_8bit": 2}
# NF4 with double quantization: 4 bits a weight, an 8-bit scale per block of 64, an fp32 one per 256 blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class Estimate:
    """A run's memory in bytes: weights (4-bit ones at NF4's size) with the trained ones' gradients and
    optimizer state (`state`); what the forward pass keeps for the backward pass, per sequence (`saved`) and
    once whatever the batch (`saved_once`: the autocast copies of fp32 weights, position tables); of the
    per-sequence part, each transformer block's input (`block_input`, all that checkpointing keeps of a
    block)."""

    state: int
    saved: int
    saved_once: int
    block_input: int
    blocks: int

    def allocated(self, micro: int, checkpointing: bool) -> float:
        """The estimated peak of allocated bytes at `micro` sequences a micro-step."""
        saved = self.saved * micro
        if checkpointing:  # every block's input; one block's activations recomputed, and their gradients
            saved = self.blocks * self.block_input * micro + 2 * saved / self.blocks
        return self.state + (self.saved_once + saved) * (1 + BACKWARD_SHARE)

    def reserved(self, micro: int, checkpointing: bool) -> float:
        """The estimated peak of reserved bytes, what an out-of-memory error is decided on."""
        return self.allocated(micro, checkpointing) * (1 + RESERVE_SHARE)

    def probe(self, micro: int, checkpointing: bool) -> tuple[float, None]:
        """`memory.plan_micro_batch`'s probe: the estimated peak reserved, and no time."""
        return self.reserved(micro, checkpointing), None


def plan_row(spec: RunSpec, longest: int, budget_bytes: int, total_steps: int) -> dict:
    """`peftbench plan`'s row for `spec` where no GPU can be probed: the micro-batch search over the
    Estimate at the probe's shape (the micro-batch's longest sequences, padded as on CUDA to `longest`);
    `total_steps`: the run's optimizer steps (AdaLoRA's schedule is built from them)."""
    row = {"run_id": spec.runtime.run_id, "label": spec.label, "method": spec.method, "estimated": True}
    if budget_bytes <= CONTEXT_BYTES:
        return {
            **row,
            "status": "does not fit",
            "error": f"does not fit in {budget_bytes / GiB:.1f} GB: a GPU's CUDA context and libraries alone "
            f"hold about {CONTEXT_BYTES / GiB:.0f} GB",
        }
    model, est = estimate_run(spec, longest, total_steps)
    cap = budget_bytes - CONTEXT_BYTES
    fit = plan_micro_batch(est.probe, spec.train.batch_size, spec.train.gradient_checkpointing, cap)
    row.update(fit.as_dict())
    row.update(
        status="planned" if fit.fits else "does not fit",
        budget_mb=budget_bytes / 2**20,
        allocator_cap_mb=cap / 2**20,
        length=longest,
        estimate={
            "state_mb": est.state / 2**20,
            "saved_mb_per_sequence": est.saved / 2**20,
            "saved_mb_once": est.saved_once / 2**20,
        },
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if not fit.fits:
        ckpt = " with gradient checkpointing" if fit.tried[-1]["gradient_checkpointing"] else ""
        row["error"] = (
            f"does not fit in {budget_bytes / GiB:.1f} GB at micro-batch 1{ckpt}: needs an estimated "
            f"{fit.needed()}" + bf16_weights_hint(spec.train.optimizer, row["trainable_params"])
        )
    return row


def estimate_run(spec: RunSpec, length: int, total_steps: int = 1000):
    """The meta model of `spec` as a CUDA run of `total_steps` builds it (autocast `auto` is bf16, as on a
    GPU that has it), and its Estimate at sequences of `length` tokens."""
    amp = {"fp32": None, "fp16": torch.float16}.get(spec.train.precision, torch.bfloat16)
    model, _ = meta_model(spec, spec.label_names, amp, total_steps)
    quantized = four_bit_weights(model) if registry.get(spec.method).quantize else set()
    norms = spec.train.layer_norms != "fp32" and amp == torch.bfloat16  # as `norms.choose_layer_norms`
    return model, estimate(model, spec.train.optimizer, amp, length, quantized.__contains__, norms)


def four_bit_weights(model) -> set[str]:
    """The weights QLoRA holds in 4 bits: every frozen linear layer's outside the head
    (`models.QUANT_SKIP`)."""
    return {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and not m.weight.requires_grad  # an adapter's own layers are not
        and not set(name.split(".")) & set(registry.HEAD_MODULES)
    }


def estimate(
    model, optimizer: str, amp, length: int, quantized: Callable[[str], bool], bf16_norms: bool = False
) -> Estimate:
    """The Estimate of `model` (on the meta device) trained under `amp` autocast (None: fp32) on sequences
    of `length` tokens; `quantized(name)` tells the frozen weights held in 4 bits; `bf16_norms`: layer norms
    in bf16 (`norms.bf16_layer_norms`)."""
    config = model.config.get_text_config()
    four_bit = {id(p) for name, p in model.named_parameters() if quantized(name)}
    one, two = (saved_bytes(model, n, length, amp, four_bit, bf16_norms) for n in (1, 2))
    return Estimate(
        state=state_bytes(model, optimizer, quantized),
        saved=two - one,
        saved_once=2 * one - two,
        block_input=length * config.hidden_size * (torch.finfo(amp).bits // 8 if amp else 4),
        blocks=config.num_hidden_layers,
    )


def state_bytes(model, optimizer: str, quantized: Callable[[str], bool]) -> int:
    """Weights, and for trained ones their gradient and optimizer state. Gradients are counted as held
    throughout, as under gradient accumulation and CUDA graphs, where each fresh gradient is made before it
    is added in: the largest trained tensor's is counted once more."""
    total, largest = 0.0, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel() * (2 * p.element_size() + STATE_BYTES[optimizer])
            largest = max(largest, p.numel() * p.element_size())
        else:
            total += p.numel() * (NF4_BYTES if quantized(name) else p.element_size())
    return int(total) + largest


def saved_bytes(
    model, sequences: int, length: int, amp, four_bit: frozenset | set = frozenset(), bf16_norms: bool = False
) -> int:
    """Bytes autograd keeps for the backward pass over a batch of `sequences` of `length` tokens, each
    storage once and weights not at all (`state_bytes` has them); `four_bit`: the ids of the weights
    QLoRA holds in 4 bits; `bf16_norms`: layer norms in bf16."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in weights:
            kept.setdefault(key, t.untyped_storage().nbytes())
        return t

    ids = torch.zeros(sequences, length, dtype=torch.long, device=next(model.parameters()).device)
    autocast = MetaAutocast(amp, four_bit, bf16_norms)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, _no_padding_check():
        model_forward(model, ids, None)  # as a run calls it: prefix tuning's prefixes too
    return sum(kept.values())


@contextlib.contextmanager
def _no_padding_check():
    """Without a padding mask, some models (GPT-2, DeBERTa) look for padding in the ids to warn of it: a
    value the meta device has not. Their check is skipped while the estimate runs."""
    check = PreTrainedModel.warn_if_padding_and_no_attention_mask
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
    try:
        yield
    finally:
        PreTrainedModel.warn_if_padding_and_no_attention_mask = check


class FusedAttention(torch.autograd.Function):
    """Attention as the fused CUDA kernels keep it for the backward pass (flash and memory-efficient: the
    inputs, the output and one fp32 log-sum-exp per row), where the meta device would run the unfused
    math, which keeps the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        # (batch, heads, length, dim) laid out as (batch, length, heads, dim), as the kernels write it: the
        # model's reshape back to (batch, length, width) is then a view, not a copy the next layer keeps
        if q.dim() == 4:
            b, h, n, _ = q.shape
            out = q.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FourBitLinear(torch.autograd.Function):
    """A linear layer as bitsandbytes' 4-bit one computes it: in the compute dtype, its output cast back
    to the input's dtype, and nothing kept for the backward pass but the 4-bit weight (which
    `state_bytes` counts). An fp32 input so gives an fp32 output, which the next operator keeps."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.in_features = x.shape[-1]
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(*grad.shape[:-1], ctx.in_features), None


class FusedDropout(torch.autograd.Function):
    """Dropout as CUDA keeps it for the backward pass (`native_dropout`: a one-byte mask per element), where
    the meta device, like the CPU, keeps a noise tensor of the input's dtype (4 bytes an element in fp32)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x.new_empty(x.shape, dtype=torch.bool))
        return x.new_empty(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad)


# torch.autocast casts CUDA (and CPU) tensors only: on the meta device its casts are made here, for the
# operators that make up what a transformer keeps (matrix products in the autocast dtype; norms, softmax and
# the loss in fp32)
LOW_PRECISION = {
    F.linear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
}
FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy, torch.Tensor.softmax}


def _cast(args, dtype):
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class MetaAutocast(TorchFunctionMode):
    """CUDA's autocast to `amp` (None: none), fused attention and dropout, 4-bit linear layers (the
    weights in `four_bit`) and, with `bf16_norms`, layer norms in `amp` (`norms.bf16_layer_norms`), for a
    forward pass on the meta device."""

    def __init__(self, amp, four_bit: frozenset | set = frozenset(), bf16_norms: bool = False):
        super().__init__()
        self.amp, self.four_bit = amp, four_bit
        self.low = LOW_PRECISION | {F.layer_norm} if bf16_norms else LOW_PRECISION

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1 and id(args[1]) in self.four_bit:
            return FourBitLinear.apply(args[0], args[1])
        if func is F.scaled_dot_product_attention:
            return FusedAttention.apply(*(_cast(args[:3], self.amp) if self.amp else args[:3]))
        if func is F.dropout and _dropping(*args, **kwargs):
            return FusedDropout.apply(args[0])
        if self.amp is not None and func in self.low:
            args = _cast(args, self.amp)
        elif self.amp is not None and func in FP32:
            args = _cast(args, torch.float32)
        return func(*args, **kwargs)


def _dropping(input, p=0.5, training=True, inplace=False) -> bool:
    """Whether `F.dropout(input, p, training, inplace)` drops anything (CUDA's fused kernel is used then)."""
    return training and 0 < p < 1 and input.requires_grad
