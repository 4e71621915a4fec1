"""One run as a recipe, read top to bottom: `setup` (model, optimizer, scheduler, memory plan), then for
each epoch `train_epoch`, `validate` and `checkpoint`, then `finish` (test, measure, save, reload check).

The loop is written out (as PEFT's own method comparison does) so every cost is visible and can be
measured: length-bucketed batches padded only to their own longest item, bf16 autocast where the
hardware has it, a fused AdamW, no host synchronisation inside an epoch, and the test set
evaluated once, sorted by length. Schedulers come from transformers, adapters from PEFT.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import faults, memory, packing
from . import methods as registry
from .artefacts import (
    dir_size_mb,
    load_checkpoint,
    load_trainable,
    mutated_init,
    reload_check_batches,
    save_checkpoint,
    start_save,
    trainable_state,
    verify_reload,
    write_predictions,
)
from .batches import (
    active_peft_config,
    choose_mask_mode,
    collate,
    eval_batches,
    make_batches,
    model_forward,
    pad_multiple,
    predict_logits,
    prefix_length,
)
from .batches import steps_per_epoch as count_steps
from .data import Tokenized
from .devices import MemoryMeter, autocast, autocast_dtype, cuda_index, dist_info, is_oom, peak_flops, sync
from .errors import Diverged, SkipRun, UserError
from .graphs import GRAPHS_MAX_WORK, StepGraphs
from .metrics import loss as task_loss
from .metrics import import_dependencies_soon, model_flops_per_token, oriented, predict, score, validation_at
from .spec import RunSpec
from .tracking import StepProfiler, Tracker

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")

# Warm trials (the study's `warm_trials`): lr-search trials of one method run one after another in one worker
# process, and each takes over the last one's model, layout and CUDA graphs instead of building and recording
# them again (on an H200, ~2 s a process against a 0.8 s epoch: a halving search's trials are mostly that).
# What a trial's seed and rate decide is its own: the trainable weights and buffers its seed builds (kept per
# seed), the random state after that build, a new optimizer and scheduler.
_WARM: dict = {}
WARM_SHARED = (
    "model", "head", "trainable", "total", "prefixed", "fwd", "compiled", "pad_multiple", "mask_mode",
    "arch", "packing_off", "packing_saving", "pack_multiple", "max_seqlen", "memory_plan", "micro",
    "checkpointing", "graphs_off", "graphs", "loss_sum", "score_scale", "loss_unit", "layer_norms",
)  # fmt: skip


def forget_warm() -> None:
    """Drop the model a warm trial left in this process (before a run that is not a warm trial)."""
    if _WARM:
        import gc

        import torch

        _WARM.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _set_rng(cpu, cuda, device: str) -> None:
    import torch

    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def compile_blocks(model) -> int:
    """torch.compile, in place, each block of `model`'s repeated ones (its transformer layers): regional
    compilation (PyTorch's recipe for compile time), one compiled code for every layer, where compiling the
    whole model took most of a 165-s first epoch (benchmarks/results/h200-roberta-compile.json). Compiled
    with dynamic sizes, batch shapes share one code as long as its guards hold; a shape that breaks one
    recompiles, so `graphs.StepGraphs` runs each new shape once eagerly before capturing it. The state dict
    keeps its names. Returns how many blocks."""
    import torch

    repeated = [
        blocks
        for blocks in model.modules()
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 1 and len({type(b) for b in blocks}) == 1
    ]
    for block in (b for blocks in repeated for b in blocks):
        # dropout from torch's own random ops: drawn as an uncompiled run draws it (tests/test_runner.py)
        block.compile(dynamic=True, options={"fallback_random": True})
    return sum(len(blocks) for blocks in repeated)


def allow_recompiles(limit: int = 64) -> None:
    """torch.compile's per-function recompile limit raised to `limit` (torch's default is 8): a run's bucketed
    shapes, train and eval modes and dtypes each recompile, and past the limit torch runs eagerly."""
    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), limit))


def train_run(spec: RunSpec, tok: Tokenized, run_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate one run; returns the `metrics`, `history` and artefact info for result.json.

    An epoch checkpoint (`checkpoint.pt`, once `checkpoint_every_seconds` of training have passed since the
    last) lets a killed run resume from that epoch.
    """
    recipe = Recipe(spec, tok, run_dir, progress)
    try:
        recipe.setup()
        stop = min(spec.runtime.stop_after_epoch or recipe.train.epochs, recipe.train.epochs)
        for epoch in range(recipe.start_epoch, stop):
            recipe.train_epoch(epoch)
            recipe.validate(epoch)
            recipe.checkpoint(epoch)
        return recipe.finish() if stop == recipe.train.epochs else recipe.pause(stop)
    except Diverged:
        raise  # the next warm trial puts back every weight this one changed
    except BaseException:  # what it leaves behind (a failed capture, an OOM mid-step) is not taken over
        forget_warm()
        raise


def plan_run(spec: RunSpec, tok: Tokenized, run_dir: Path) -> dict:
    """The memory plan alone (`peftbench plan`): set up the run, probe, and estimate its time; no training."""
    recipe = Recipe(spec, tok, run_dir, progress=False)
    recipe.setup()
    return recipe.plan_summary()


def make_optimizer(name: str, groups: list[dict], lr: float, device: str, amp=None):
    """torch's fused AdamW; optimi's AdamW over bf16 weights, with Kahan summation and torch's defaults; or
    bitsandbytes' 8-bit AdamW (paged: its state pages out to host memory)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=device.split(":")[0] in ("cuda", "cpu"))
    if name == "adamw_bf16":
        if amp != torch.bfloat16:
            raise SkipRun(
                "optimizer adamw_bf16 trains bf16 weights: it needs bf16 autocast (train.precision: bf16 or "
                "auto on a device with bf16)"
            )
        import warnings

        import optimi

        # foreach, not optimi's Triton kernels: those launch one kernel per tensor, each with a host sync;
        # they trained roberta-base at half the fp32 path's samples/s on an H200
        # (benchmarks/results/h200-bf16-weights.json). optimi 0.3 warns that foreach is deprecated: the
        # dependency stays below 0.4 until its Triton step is measured again.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Parameter `foreach` is deprecated", DeprecationWarning)
            return optimi.AdamW(
                groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, kahan_sum=True, foreach=True, triton=False
            )
    from .models import quantization_supported

    reason = quantization_supported(device)
    if reason:
        raise SkipRun(f"optimizer {name} needs bitsandbytes: {reason}")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    if name.startswith("paged") and not device.startswith("cuda"):
        raise SkipRun(f"optimizer {name} pages GPU memory out to the host: it needs a CUDA GPU")
    return cls(groups, lr=lr)


def param_groups(model, lr: float, head_lr: float | None, weight_decay: float, head: list[str]) -> list[dict]:
    """AdamW groups: no decay for biases and norms (as transformers' Trainer), optional head learning rate."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name.lower()
        is_head = head_lr is not None and any(f"{h}." in name or name.startswith(h + ".") for h in head)
        groups.setdefault((decay, is_head), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": head_lr if is_head else lr}
        for (decay, is_head), ps in groups.items()
    ]


NO_BIAS = "the head's output layer has no bias"


def score_outputs(model, head: list[str]) -> list:
    """A regression head's output layers: the trained one-output `nn.Linear` modules in the head (under
    PEFT the trained copy of `modules_to_save`, not the frozen original)."""
    import torch.nn as nn

    return [
        m
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and m.out_features == 1
        and m.weight.requires_grad
        and any(f".{h}." in f".{name}." for h in head)  # the module or one inside it, behind any prefix
    ]


def scaled_score_groups(groups: list[dict], outputs: list, std: float) -> list[dict]:
    """Optimizer groups where the score head's output layers step `std` times further, with weight decay
    divided by `std` (so lr x decay is unchanged): with the layer scaled by `std` at the start
    (`Recipe._scale_score_head`), this is training on standardized scores (Adam's steps do not depend on a
    gradient's scale)."""
    ids = {id(p) for m in outputs for p in m.parameters()}
    out = []
    for g in groups:
        mine = [p for p in g["params"] if id(p) in ids]
        rest = [p for p in g["params"] if id(p) not in ids]
        out += [{**g, "params": rest}] if rest else []
        if mine:
            out.append({**g, "params": mine, "lr": g["lr"] * std, "weight_decay": g["weight_decay"] / std})
    return out


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing through transformers (non-reentrant: frozen inputs need no grad hooks).
    transformers 5.2x calls it activation checkpointing and warns on the old names, which older 5.x has
    alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        if on:
            raise UserError(
                f"gradient_checkpointing: {type(base).__name__} does not support it; set it to false"
            )
        return
    new = hasattr(type(base), "activation_checkpointing_enable")
    if on and new:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif new and base.is_activation_checkpointing:
        base.activation_checkpointing_disable()
    elif not new and base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


def shard(model, amp) -> None:
    """FSDP2 (`fully_shard`): each transformer block (the model's `_no_split_modules`) one unit, then the
    rest; parameters kept and updated sharded in their own dtype (fp32 master weights for what trains),
    computed in the autocast dtype, gradients reduced in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


class Recipe:
    """The state of one run between its steps. Each step is a method; `train_run` calls them in order."""

    def __init__(self, spec: RunSpec, tok: Tokenized, run_dir: Path, progress: bool):
        self.spec, self.tok, self.run_dir = spec, tok, Path(run_dir)
        self.train = spec.train
        self.device = spec.runtime.device
        self.dev_type = self.device.split(":")[0]
        self.method = registry.get(spec.method)
        self.rank, self.world = dist_info()
        self.progress = progress and self.rank == 0 and os.environ.get("PEFTBENCH_PROGRESS", "1") != "0"
        self.phases: dict[str, float] = {}  # where the run's wall time goes, outside the timed training
        self.history: list[dict] = []
        self.best = {"score": -math.inf, "epoch": None, "state": None}
        self.train_seconds = self.val_seconds = 0.0
        self.start_epoch = 0
        self.memory_plan: dict | None = None
        self.checkpointing = self.train.gradient_checkpointing is True
        self.sharded = self.train.sharding == "fsdp" and self.world > 1
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.checkpointed_seconds = 0.0  # the training time the last epoch checkpoint holds
        self.warm = False  # set up by taking over an earlier trial's model (`_adopt_warm`)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step: device, model, optimizer, scheduler, memory plan, resume."""
        import torch

        torch.manual_seed(self.spec.seed)
        np.random.seed(self.spec.seed % 2**32)
        self._setup_device()
        self._setup_data()
        if not self._adopt_warm():
            self._setup_model()
            import_dependencies_soon()  # for the first validation: beside the steps before it
            self._setup_norms()
            self._setup_optimizer()
            self._setup_forward()
            if self._plan_memory():  # a smaller micro-step may take the graphs a larger one was refused;
                self._choose_layout()  # a checkpointed one packs no batches
            set_checkpointing(self.model, self.checkpointing)
            self._setup_graphs()
            self._keep_warm()
        self._resume()
        self._setup_reporting()

    # ------------------------------------------------------------------------------------------ warm trials
    def _adopt_warm(self) -> bool:
        """Take over the model, its layout and its CUDA graphs from the last trial this process ran of the
        same method and settings (`warm_trials`): the weights become the ones this run's seed builds, with
        their random state after the build, and the optimizer and scheduler are new. False: set up from
        scratch."""
        if not (self.spec.runtime.warm and _WARM.get("key") == self.spec.warm_key()):
            forget_warm()
            return False
        self.__dict__.update(_WARM["shared"])
        self.load_seconds = 0.0
        if self.spec.seed not in _WARM["inits"]:
            _WARM["inits"][self.spec.seed] = self._initial_state(self._build_initial())
        weights, cpu_rng, cuda_rng = _WARM["inits"][self.spec.seed]
        load_trainable(self.model, weights)
        self._setup_optimizer()
        if self.graphs is not None:
            self.graphs.loss_of = self.batch_loss
        _set_rng(cpu_rng, cuda_rng, self.device)
        self.warm = True
        return True

    def _keep_warm(self) -> None:
        """Keep this trial's model, layout and graphs for the next trial of the same settings in this process,
        where nothing but the seed's weights and the optimizer would differ (see `_warm_blocker`)."""
        if not self.spec.runtime.warm or self._warm_blocker():
            return
        _WARM.update(
            key=self.spec.warm_key(),
            shared={k: getattr(self, k) for k in WARM_SHARED},
            inits={self.spec.seed: self._initial_state(self.model)},
        )

    def _warm_blocker(self) -> str | None:
        """Why the next trial cannot take this run's model over (None: it can)."""
        reasons = (
            (self.graphs is None and self.dev_type == "cuda", "no CUDA graphs to keep"),
            (self.world > 1, "data-parallel run"),
            (bool(self.compiled), "torch.compile'd run"),
            (self.spec.gpu_memory_bytes is not None, "a GPU memory budget (a second build would count)"),
            (not self._room_for_a_second_build(), "no room on the device to build a seed's weights beside"),
            (self.method.after_step is not None, "the method keeps state outside its weights"),
            (mutated_init(self.model), "the initialisation changes the base weights"),
        )
        return next((why for bad, why in reasons if bad), None)

    def _room_for_a_second_build(self) -> bool:
        """A warm trial of a new seed builds its model beside the one it takes over: free device memory for
        twice the weights, as they are before training."""
        if self.dev_type != "cuda":
            return True
        import torch

        held = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return torch.cuda.mem_get_info(self.device)[0] >= 2 * held

    def _build_initial(self):
        """The model this run's seed builds (the random state as a fresh process has it after the build)."""
        from .models import build_model

        t = time.perf_counter()
        model, _ = build_model(self.spec, self.tok.label_names, self.device, self.total_steps, self.amp)
        self._scale_score_head(model)
        self.load_seconds = time.perf_counter() - t
        return model

    def _scale_score_head(self, model) -> None:
        """Regression: train as on standardized scores, with predictions on the scores' own scale. The head's
        output layer starts scaled by the training scores' std, its bias shifted by their mean, and steps
        std times further (`scaled_score_groups`); the loss is divided by std^2. A head that starts near 0
        and moves a learning rate's worth a step could not otherwise reach scores of tens or hundreds; the
        saved model needs nothing to undo. A head without a bias (Llama's) is scaled only: it trains as on
        scores divided by their std, and learns their mean in std units."""
        if self.spec.task != "regression":
            return
        outputs = score_outputs(model, self.head)
        y = self.tok.labels["train"]
        mean, std = float(y.mean()), float(y.std())
        why = self._score_scale_blocker(outputs)
        no_bias = any(m.bias is None for m in outputs)
        state = f"off: {why}" if why else f"scale only: {NO_BIAS}" if no_bias else "on"
        self.score_scale = {"mean": mean, "std": std, "standardized": state}
        self.loss_unit = 1.0
        if why:
            return
        import torch

        with torch.no_grad():
            for m in outputs:
                m.weight.mul_(std)
                if m.bias is not None:
                    m.bias.mul_(std).add_(mean)
        self.loss_unit = 1.0 / std**2

    def _score_scale_blocker(self, outputs: list) -> str | None:
        from .models import load_config

        base = load_config(self.spec.model_path, self.spec.trust_remote_code)
        reasons = (
            (not outputs, "no trained one-output linear layer in the head"),
            (
                base.num_labels == 1 or getattr(base, "problem_type", None) == "regression",
                "the checkpoint's head already predicts scores",
            ),
        )
        return next((why for bad, why in reasons if bad), None)

    def _initial_state(self, model) -> tuple:
        """A model's trainable weights and buffers, and the random state, as training starts."""
        import torch

        weights = {**trainable_state(model), **{n: b.detach().clone() for n, b in model.named_buffers()}}
        cuda = torch.cuda.get_rng_state(self.device) if self.dev_type == "cuda" else None
        return weights, torch.get_rng_state(), cuda

    def _setup_device(self) -> None:
        if self.dev_type == "cuda":
            import torch

            t = time.perf_counter()
            # the CUDA context: its cost is the run's, not the first step's
            torch.zeros(1, device=self.device)
            self.phases["cuda_init"] = time.perf_counter() - t
            budget = self.spec.gpu_memory_bytes
            if budget:
                self.memory_cap = memory.cap_allocator(budget, self.device)
            else:  # an earlier run in this process may have left its cap
                torch.cuda.set_per_process_memory_fraction(1.0, cuda_index(self.device))
        self.meter = MemoryMeter(self.device)
        self.amp = autocast_dtype(self.train.precision, self.device)

    def _setup_data(self) -> None:
        self.lengths = self.tok.lengths("train")
        self.batch_size = self.train.batch_size
        self.micro = min(self.train.micro_batch_size or self.batch_size, self.batch_size)
        self.steps_per_epoch = count_steps(len(self.lengths), self.batch_size, self.train.group_by_length)
        self.total_steps = self.steps_per_epoch * self.train.epochs
        self.pad_id = self.spec.pad_token_id or 0
        self.max_len = self.spec.effective_max_length
        self.ids_train = self.tok.ids["train"]
        import torch

        self.labels_train = torch.from_numpy(self.tok.labels["train"])
        self.n_labels = len(self.tok.label_names)
        self.score_scale, self.loss_unit = None, 1.0  # regression: `_scale_score_head`

    def _setup_model(self) -> None:
        from .models import build_model, count_params

        t = time.perf_counter()
        try:
            self.model, self.head = build_model(
                self.spec,
                self.tok.label_names,
                self.device,
                self.total_steps,
                self.amp,
            )
        except Exception as e:
            budget = self.spec.gpu_memory_bytes
            if budget and is_oom(e):  # under the cap, the weights alone do not fit
                raise SkipRun(
                    f"does not fit in {budget / 2**30:.1f} GB: loading the weights ran out of memory"
                ) from None
            raise
        self._scale_score_head(self.model)
        self.load_seconds = time.perf_counter() - t
        if (
            mutated_init(self.model) and self.rank == 0
        ):  # PiSSA & co: keep the initial adapter to convert the final one
            self.model.save_pretrained(self.run_dir / "adapter-init", safe_serialization=True)
        self.trainable, self.total = count_params(self.model)
        if self.sharded:
            if str(self.amp) == "torch.float16":
                raise UserError(
                    "train.sharding: fsdp with fp16 autocast needs sharded loss scaling, which is not built; "
                    "set train.precision: fp32 (or bf16 on a GPU that has it)"
                )
            shard(self.model, self.amp)

    def _setup_norms(self) -> None:
        """Layer norms that take and give bf16 under bf16 autocast, where `train.layer_norms` and its probe
        allow (`norms.choose_layer_norms`)."""
        from .norms import choose_layer_norms

        t = time.perf_counter()
        args = (self.ids_train, self.pad_id, self.device, self.max_len, self.train.layer_norms, self.amp)
        self.layer_norms = choose_layer_norms(self.model, *args)
        self.phases["norms_probe"] = time.perf_counter() - t

    def _setup_optimizer(self) -> None:
        import torch
        from transformers import get_scheduler

        cfg = self.train
        self.params = param_groups(
            self.model, cfg.learning_rate, cfg.head_learning_rate, cfg.weight_decay, self.head
        )
        if self.score_scale and not self.score_scale["standardized"].startswith("off"):
            outputs = score_outputs(self.model, self.head)
            self.params = scaled_score_groups(self.params, outputs, self.score_scale["std"])
        self.optimizer = make_optimizer(cfg.optimizer, self.params, cfg.learning_rate, self.device, self.amp)
        warmup = int(round(cfg.warmup_ratio * self.total_steps))
        self.scheduler = get_scheduler(
            cfg.scheduler, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        self.grad_params = [p for g in self.params for p in g["params"]]  # what gradient clipping rescales
        # fp16 autocast: the loss is scaled so that small gradients survive fp16, and a step whose gradients
        # overflowed is skipped (torch's GradScaler); bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(self.dev_type) if self.amp == torch.float16 else None

    def _setup_forward(self) -> None:
        """Data parallelism, compilation and the batch layout: how a batch reaches the model."""
        import torch

        self.prefixed = prefix_length(self.model) > 0
        if self.prefixed and self.world > 1:
            raise UserError("prefix_tuning runs on one device here; set gpus_per_run: 1 for it")
        self.fwd = self.model
        if (
            self.world > 1 and not self.sharded
        ):  # data parallel: each process takes every world-th item of each batch of `batch_size`
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.dev_type == "cuda" else None
            self.fwd = DistributedDataParallel(self.fwd, device_ids=ids)
        self.compiled = False
        if self.train.compile and not self.prefixed:
            self._compile()
        self.pad_multiple = pad_multiple(self.train, self.dev_type == "cuda")
        self._choose_layout()

    def _choose_layout(self) -> None:
        """The attention-mask form and packing, for the run's micro-batch (again after a memory plan that
        changes it: whether a micro-step is graphed, and so the mask it wants, depends on its size)."""
        t = time.perf_counter()
        forced = self.train.attention_mask
        if forced == "auto" and self.step_work() > GRAPHS_MAX_WORK:
            forced = "2d"  # a ready 4D mask serves CUDA graphs, which such a step is not given (graphs.py)
        self.mask_mode = choose_mask_mode(
            self.model,
            self.ids_train,
            self.pad_id,
            self.device,
            max_len=self.max_len,
            forced=forced,
            amp=self.amp,
        )
        self.phases["mask_probe"] = self.phases.get("mask_probe", 0.0) + time.perf_counter() - t
        self._setup_packing()

    def _setup_packing(self) -> None:
        """Padding-free batches (packing.py) where the model supports them, they save enough tokens and
        the logits are unchanged (and, with `auto`, the steps are graphed: `_setup_graphs`). A packed row
        is padded to 8 x the padding multiple: few shapes, each a graph recording."""
        t = time.perf_counter()
        blocker = next(
            (
                why
                for bad, why in (
                    (self.world > 1, "not built for data-parallel runs"),
                    (self.compiled_whole, "not built for torch.compile'd runs"),
                    (self._prompt_method(), "not built for prompt methods (PEFT's own forward adds them)"),
                    (self.checkpointing, "not built for gradient checkpointing"),
                )
                if bad
            ),
            None,
        )
        self.pack_multiple = self.pad_multiple * 8
        longest = min(int(self.lengths.max()), self.max_len or 1 << 30)
        lengths = np.minimum(self.lengths, longest)
        parts = self._epoch_parts(self.micro)
        self.packing_saving = packing.token_saving(lengths, parts, self.pad_multiple, self.pack_multiple)
        self.arch, self.packing_off = packing.choose(
            self.model,
            self.ids_train,
            self.pad_id,
            self.device,
            self.max_len,
            self.train.packing,
            self.amp,
            blocker,
            self.packing_saving,
        )
        self.max_seqlen = max(longest, self.pack_multiple)  # the padding tail is a sequence too
        self.phases["packing_probe"] = self.phases.get("packing_probe", 0.0) + time.perf_counter() - t

    def _prompt_method(self) -> bool:
        cfg = active_peft_config(self.model)
        return bool(getattr(cfg, "is_prompt_learning", False))

    def host_batch(self, items: np.ndarray) -> tuple:
        """One (micro-)batch as host tensors: packed (ids, positions, offsets, segments, picks, labels) or
        padded (ids, mask, labels); pinned on CUDA."""
        seqs = [self.ids_train[j] for j in items]
        if self.arch is not None:
            x = packing.pack(seqs, self.pad_id, self.pack_multiple, self.max_len, last=self.arch[2])
        else:
            x = collate(seqs, self.pad_id, self.pad_multiple, self.max_len)
        x = (*x, self.labels_train[items])
        return tuple(t.pin_memory() for t in x) if self.dev_type == "cuda" else x

    def batch_loss(self, *batch):
        """The loss of one (micro-)batch of device tensors from `host_batch`, as the model computes it."""
        if self.arch is not None:
            loss = packing.packed_forward(
                self.model, self.arch, *batch[:-1], max_seqlen=self.max_seqlen, labels=batch[-1]
            )[0]
        else:
            ids, mask, y = batch
            loss = model_forward(self.fwd, ids, mask, self.mask_mode, labels=y).loss
        return loss if self.loss_unit == 1.0 else loss * self.loss_unit  # no kernel where there is no scale

    def _compile(self) -> None:
        """torch's default: the first shape compiles static, the first new shape recompiles with dynamic
        sizes;
        "cudagraphs" adds CUDA graphs, recorded once per bucketed shape, on one device only (a data-parallel
        run compiles around DDP, without graphs); "blocks" compiles the repeated layers only
        (`compile_blocks`), and the rest of the step stays as it is (packing, peftbench's CUDA graphs)."""
        import torch

        allow_recompiles()
        if self.train.compile == "blocks":
            if not compile_blocks(self.model):
                raise UserError(
                    f"train.compile: blocks found no repeated layers in {self.spec.model_path}; "
                    "set compile: true to compile the whole model"
                )
            self.compiled = "blocks"
            return
        graphs = self.train.compile == "cudagraphs" and self.world == 1 and self.dev_type == "cuda"
        self.fwd = torch.compile(self.fwd, mode="reduce-overhead" if graphs else None)
        self.compiled = "cudagraphs" if graphs else True

    @property
    def compiled_whole(self) -> bool:
        """The whole forward is torch.compile'd: peftbench's graphs and packing stay out of its way."""
        return bool(self.compiled) and self.train.compiles_whole

    def _plan_memory(self) -> bool:
        """Under a GPU memory budget, the largest micro-batch (and checkpointing if needed) that fits;
        True where that changed the micro-batch or checkpointing."""
        budget = self.spec.gpu_memory_bytes
        if not (budget and self.dev_type == "cuda") and not self.spec.runtime.plan_only:
            return False
        setting = self.train.gradient_checkpointing
        limit = int(self.memory_cap["allocator_cap_mb"] * 2**20) if budget else self._device_total()
        fit = memory.plan_micro_batch(self.probe, self.batch_size, setting, limit)
        self.memory_plan = {**fit.as_dict(), **getattr(self, "memory_cap", {})}
        if self.dev_type != "cuda":  # time was probed, memory was not
            self.memory_plan.update(budget_mb=None, peak_reserved_mb=None)
        if not fit.fits:
            raise SkipRun(
                f"does not fit in {(budget or limit) / 2**30:.1f} GB at micro-batch 1"
                f"{' with gradient checkpointing' if setting else ''}: needs {fit.needed()}"
                + memory.bf16_weights_hint(self.train.optimizer, self.trainable)
            )
        changed = (fit.micro_batch_size, fit.gradient_checkpointing) != (self.micro, self.checkpointing)
        self.micro, self.checkpointing = fit.micro_batch_size, fit.gradient_checkpointing
        return changed

    def _device_total(self) -> int:
        if self.dev_type != "cuda":
            return 1 << 62  # no GPU memory to plan: the probe measures time only
        import torch

        return torch.cuda.mem_get_info(self.device)[1]

    def probe(self, micro: int, checkpointing: bool) -> tuple[float | None, float | None]:
        """Peak reserved bytes and seconds of a micro-step (forward, backward, optimizer step) at the run's
        longest shape; (None, None) when it runs out of memory. The weights do not move (lr 0), and the
        optimizer state, gradients and random state are put back: training afterwards is unchanged.
        Checkpointed, it probes padded batches: a checkpointed run trains on those (`_setup_packing`)."""
        import torch

        set_checkpointing(self.model, checkpointing)
        rng = torch.random.get_rng_state(), (torch.cuda.get_rng_state() if self.dev_type == "cuda" else None)
        # each group's settings and counters (optimi counts steps per group, not per weight), then lr 0
        groups = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in g.items() if k != "params"}
            for g in self.optimizer.param_groups
        ]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        if self.dev_type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        packed, self.arch = self.arch, None if checkpointing else self.arch
        try:
            longest = np.argsort(-self.lengths, kind="stable")[:micro]
            batch = [x.to(self.device) for x in self.host_batch(longest)]
            seconds = [self._probe_step(batch, micro < self.batch_size) for _ in range(2)][-1]
            peak = torch.cuda.max_memory_reserved() if self.dev_type == "cuda" else 0
            return float(peak), seconds
        except Exception as e:
            if not is_oom(e):
                raise
            return None, None
        finally:
            self.arch = packed
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()
            for g, saved in zip(self.optimizer.param_groups, groups):
                params = g["params"]
                g.clear()  # what the probe's steps added goes too
                g.update(saved, params=params)
            torch.random.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1])
                torch.cuda.empty_cache()

    def _probe_step(self, batch: list, accumulating: bool) -> float:
        """Seconds per micro-step of one optimizer step: with gradient accumulation, two micro-steps, so
        that the second's forward runs beside the first's gradients, as every later micro-step does."""

        sync(self.device)
        t = time.perf_counter()
        self.model.train()
        for _ in range(2 if accumulating else 1):
            with autocast(self.device, self.amp):
                loss = self.batch_loss(*batch)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return (time.perf_counter() - t) / (2 if accumulating else 1)

    def _setup_graphs(self) -> None:
        """CUDA graphs where the run allows them; `packing: auto` packs graphed steps only."""
        import torch

        self.loss_sum = torch.zeros((), device=self.device)
        self.graphs_off = self._graphs_blocker()
        why = packing.eager_reason(self.train.packing, self.graphs_off) if self.arch is not None else None
        if why:
            self.arch, self.packing_off = None, why
            self.graphs_off = self._graphs_blocker()
        self.graphs = None
        if self.graphs_off is None:
            self.graphs = StepGraphs(
                self.batch_loss,
                self.amp,
                self.loss_sum,
                self.grad_params,
                self.train.max_grad_norm if self.micro >= self.batch_size else None,  # else after the last
                budgeted=bool(self.spec.gpu_memory_bytes),
                model=self.model,
                accumulating=self.micro < self.batch_size,
                compiled=self.compiled == "blocks",
                optimizer=self.optimizer,
            )

    def _graphs_blocker(self) -> str | None:
        return StepGraphs.unsupported(
            self.train,
            self.method,
            self.device,
            self.world,
            self.micro,
            "packed" if self.arch is not None else self.mask_mode,
            self.prefixed,
            self.compiled_whole,
            self.checkpointing,
            self.step_work(),
            scaled=self.scaler is not None,
        )

    def step_work(self) -> float:
        """Parameters x tokens of a micro-step at the longest shape: what decides whether graphs pay."""
        return float(self.total) * self.micro * min(int(self.lengths.max()), self.max_len or 1 << 30)

    def _resume(self) -> None:
        """Continue from the last epoch checkpoint of this same config, if a killed run left one."""
        import torch

        ck = load_checkpoint(self.ckpt_path, self.spec.config_hash, self.device)
        if ck is None:
            return
        if ck.get("score_scale") != self.score_scale:  # regression heads unscaled (before 2026-12-05)
            print(
                f"peftbench: warning: the checkpoint {self.ckpt_path} trained its scores otherwise (an older "
                "peftbench); the run starts from scratch",
                file=sys.stderr,
            )
            return
        load_trainable(self.model, ck["trainable"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"].cpu())
        self.history, self.train_seconds, self.val_seconds = (
            ck["history"],
            ck["train_seconds"],
            ck["val_seconds"],
        )
        self.start_epoch = ck["epoch"] + 1
        self.checkpointed_seconds = self.train_seconds
        best = ck.get("best_state")
        if best is None and ck.get("best_epoch") == self.start_epoch:  # the checkpointed epoch was the best
            best = trainable_state(self.model, on_device=self.sharded)
        if best is not None:
            self.best = {"score": ck["best_score"], "epoch": ck["best_epoch"], "state": best}

    def _setup_reporting(self) -> None:
        self.global_step = self.start_epoch * self.steps_per_epoch
        self.bar = None
        if self.progress and sys.stderr.isatty():  # a live bar on a terminal; elsewhere a line per epoch
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total_steps,
                initial=self.global_step,
                desc=f"  {self.spec.label}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )
        self.tracker = Tracker(self.spec if self.rank == 0 else None, self.run_dir, self.device)
        profile = self.run_dir / "profile.json" if self.spec.runtime.profile else None
        self.profiler = StepProfiler(self.device, self.steps_per_epoch, profile)

    # ------------------------------------------------------------------------------------------ train
    def train_epoch(self, epoch: int) -> None:
        """One pass over the training split; its loss sum stays on the device until the epoch ends."""
        self.model.train()
        rng = np.random.default_rng([self.spec.seed, epoch])
        self.batches = make_batches(self.lengths, self.batch_size, rng, self.train.group_by_length)
        self.loss_sum.zero_()
        sync(self.device)
        start0 = self._graph_start_seconds()
        t0 = time.perf_counter()
        for i, batch in enumerate(self.batches):
            if epoch == self.start_epoch:
                self.profiler.tick(i)
            faults.before_step(self.spec.runtime.run_id, self.micro)
            self.forward_backward(batch)
            self.optimizer_step()
            self.tracker.step(
                self.global_step, self.loss_sum, batch, self.lengths, self.max_len, self.scheduler
            )
            if self.bar is not None:
                self.bar.update(1)
        sync(self.device)
        self.epoch_seconds = time.perf_counter() - t0
        self.epoch_graph_start = self._graph_start_seconds() - start0
        self.train_seconds += self.epoch_seconds
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(self.loss_sum)
            self.loss_sum /= self.world

    def _graph_start_seconds(self) -> float:
        """Seconds this process has spent starting CUDA graphs (0 without graphs)."""
        return self.graphs.start_seconds if self.graphs is not None else 0.0

    def _seconds_so_far(self, epochs_done: int) -> dict:
        """What a run that stops before its last epoch (paused at a rung, or diverged) keeps of its timing."""
        return {
            "epochs_done": epochs_done,
            "train_seconds": self.train_seconds,
            "validation_seconds": self.val_seconds,
            "warm_start": self.warm,
        }

    def forward_backward(self, batch: np.ndarray) -> None:
        """Gradients of one batch: from a CUDA graph, or eagerly in micro-batches (each process its share)."""

        if self.graphs is not None:  # one process: each micro-step from its shape's graph
            for m0 in range(0, len(batch), self.micro):
                part = batch[m0 : m0 + self.micro]
                self.graphs.run(*self.host_batch(part), weight=len(part) / len(batch))
            if self.micro < self.batch_size:  # accumulated: clipped after the last micro-step, not in a graph
                self._clip()
            return
        mine = batch[self.rank :: self.world]
        # Every process runs as many micro-steps as the largest share needs (each joins every gradient
        # reduction): a process whose share ran out, or never had one, runs an item at weight 0.
        share = -(-len(batch) // self.world)
        for m0 in range(0, share, self.micro):
            part, weight = mine[m0 : m0 + self.micro], 1.0
            if not len(part):
                part, weight = batch[:1], 0.0
            x = (t.to(self.device, non_blocking=True) for t in self.host_batch(part))
            with autocast(self.device, self.amp):
                loss = self.batch_loss(*x)
            # Weighted so that DDP's mean over processes gives the mean over the whole batch.
            loss = loss * (len(part) / len(batch) * self.world * weight)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            self.loss_sum += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        self._clip()

    def _clip(self) -> None:
        import torch

        if self.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.grad_params, self.train.max_grad_norm)

    def optimizer_step(self) -> None:
        if self.graphs is not None:  # gradient clipping's scale may go into the optimizer's kernel
            self.graphs.optimizer_step(self.optimizer)
        elif self.scaler is None:
            self.optimizer.step()
        else:  # skips the step when the scaled gradients overflowed, and adjusts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        if self.method.after_step is not None:  # the method's own per-step work (AdaLoRA), before zero_grad
            self.method.after_step(self.model, self.global_step)
        # The graphs write into the same gradient tensors: keep them, zeroed, or written over by each step.
        if self.graphs is None or not self.graphs.overwrites:
            self.optimizer.zero_grad(set_to_none=self.graphs is None)

    def validate(self, epoch: int) -> None:
        """The task's validation metrics after the epoch; a non-finite training loss ends the run as
        diverged."""
        t1 = time.perf_counter()
        task, labels, logits = self.spec.task, self.tok.labels["validation"], self.logits("validation")
        val = score(task, labels, predict(task, logits), self.n_labels)
        val_score = val[self.spec.metric]
        self.val_seconds += time.perf_counter() - t1
        loss = float(self.loss_sum.item() / len(self.batches)) / self.loss_unit  # on the scores' scale
        self.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                "validation_loss": task_loss(task, labels, logits),
                **{f"validation_{k}": v for k, v in val.items()},
                "epoch_seconds": self.epoch_seconds,
                "graph_start_seconds": self.epoch_graph_start,  # of epoch_seconds: CUDA graphs starting
                "cumulative_train_seconds": self.train_seconds,
                "learning_rate": self.scheduler.get_last_lr()[0],
            }
        )
        if not math.isfinite(loss):
            raise Diverged(
                f"the training loss became {loss} in epoch {epoch + 1}; lower the learning rate",
                self.history,
                self._seconds_so_far(epoch + 1),
            )
        self.tracker.epoch(epoch + 1, self.history[-1])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_score:.3f}")
        elif self.progress:
            print(
                f"  {self.spec.label}: epoch {epoch + 1}/{self.train.epochs}, train loss {loss:.4f}, "
                f"validation {self.spec.metric} {val_score:.4f}",
                file=sys.stderr,
                flush=True,
            )
        if self.train.select_best_epoch and oriented(self.spec.metric, val_score) > self.best["score"]:
            state = trainable_state(self.model, on_device=self.sharded)  # a shard stays where it is
            self.best = {"score": oriented(self.spec.metric, val_score), "epoch": epoch + 1, "state": state}

    def logits(self, split: str, model=None, batches: list[np.ndarray] | None = None):
        """The trained model's (or `model`'s) logits on a split, in the split's order (evaluation mode,
        length-sorted batches); with `batches`, on those batches only, in their order."""
        size = self.eval_batch_size()
        args = (self.device, self.amp, self.pad_id, self.max_len, self.mask_mode)
        model = self.model if model is None else model
        return predict_logits(model, self.tok.ids[split], size, *args, batches=batches)

    def rescore(self, model) -> tuple[np.ndarray, np.ndarray]:
        """The reload check's test items, and `model`'s logits for them, batched as the test pass was."""
        batches = reload_check_batches(eval_batches(self.tok.ids["test"], self.eval_batch_size()))
        return np.concatenate(batches), self.logits("test", model, batches)

    def eval_batch_size(self) -> int:
        """Rows per evaluation batch: eval_batch_size, but no more than a training micro-batch where memory
        made the run split its batches (on the 8B shape at micro-batch 2, 64 rows of evaluation took more
        than the training step did: benchmarks/results/h200-scale-8b.json)."""
        if self.micro < self.batch_size:
            return min(self.train.eval_batch_size, self.micro)
        return self.train.eval_batch_size

    def checkpoint(self, epoch: int) -> None:
        """After an epoch but the last, once `checkpoint_every_seconds` of training have passed since the
        last checkpoint (a full fine-tuning's write can take longer than a short epoch): what a killed run
        resumes from. Always at a pause: what a paused trial goes on from, but for the pause at the rung that
        decides its search."""
        rt = self.spec.runtime
        resumable = rt.checkpoint and not self.sharded  # a sharded run keeps no checkpoint
        pausing = epoch + 1 == rt.stop_after_epoch
        decided = rt.deciding_rung and pausing
        due = pausing or self.train_seconds - self.checkpointed_seconds >= rt.checkpoint_every_seconds
        if resumable and epoch + 1 < self.train.epochs and due and not decided and self.rank == 0:
            import torch

            t = time.perf_counter()
            save_checkpoint(
                self.ckpt_path,
                {
                    "config_hash": self.spec.config_hash,
                    "score_scale": self.score_scale,
                    "epoch": epoch,
                    "trainable": trainable_state(self.model),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "rng": torch.get_rng_state(),
                    "history": self.history,
                    "train_seconds": self.train_seconds,
                    "val_seconds": self.val_seconds,
                    "best_score": self.best["score"],
                    "best_epoch": self.best["epoch"],
                    # the trained weights again, unless this epoch is the best (a full model's is large)
                    "best_state": None if self.best["epoch"] == epoch + 1 else self.best["state"],
                },
            )
            self.phases["checkpoint"] = self.phases.get("checkpoint", 0.0) + time.perf_counter() - t
            self.checkpointed_seconds = self.train_seconds
        faults.after_epoch(self.spec.runtime.run_id, epoch + 1)

    # ------------------------------------------------------------------------------------------ finish
    def pause(self, epochs_done: int) -> dict:
        """A run stopped at a halving search's rung: its validation metric so far (the best epoch's with
        `select_best_epoch`, else the last's) and its history; the checkpoint lets it go on later."""
        if self.bar is not None:
            self.bar.close()
        # (a checkpoint from past the rung, when a rung is redone, adds nothing: the rung's epochs decide)
        chosen, value = validation_at(
            self.history, epochs_done, self.train.select_best_epoch, self.spec.metric
        )
        return {
            "paused": True,
            "metrics": {
                f"validation_{self.spec.metric}": value,
                "selected_epoch": chosen,
                **self._seconds_so_far(epochs_done),
            },
            "history": self.history,
            "artefact": None,
            "reload_check": None,
            "test_predictions": None,
        }

    def finish(self) -> dict:
        """Keep the chosen epoch, score the test split once, gather the measurements, save, reload-check."""
        if self.bar is not None:
            self.bar.close()
        self.tracker.close()
        chosen = self._restore_best_epoch()
        metrics = self._train_metrics(chosen)
        peaks = self.meter.peaks() if self.sharded else None  # before rank 0 gathers the whole model
        if self.sharded:
            self._unshard()
        t = time.perf_counter()
        # An lr-search trial keeps no model: only its validation scores are read.
        keeps = self.rank == 0 and self.spec.role == "final"
        self.saving = start_save(self.model, self.spec, self.run_dir) if keeps else None
        self.phases["save"] = time.perf_counter() - t
        test = self._test(metrics)
        metrics.update(peaks or self.meter.peaks())
        metrics["world_size"] = self.world
        metrics["sharding"] = "fsdp" if self.sharded else None
        if self.world > 1:
            self._gather_memory(metrics)
            if self.rank != 0:  # rank 0 saves, verifies and reports
                return {
                    "metrics": metrics,
                    "history": self.history,
                    "artefact": None,
                    "reload_check": None,
                    "test_predictions": None,
                }
        artefact, reload = self._save(metrics, test)
        metrics["phase_seconds"] = {
            **self.phases,
            "model_load": self.load_seconds,
            "train": self.train_seconds,
            "validation": self.val_seconds,
            "test": metrics.get("eval_seconds", 0.0),
        }
        if self.ckpt_path.exists():
            self.ckpt_path.unlink()
        return {
            "metrics": metrics,
            "history": self.history,
            "artefact": artefact,
            "reload_check": reload,
            "test_predictions": test.get("predictions"),
        }

    def _restore_best_epoch(self) -> int:
        if self.train.select_best_epoch and self.best["state"] is not None:
            load_trainable(self.model, self.best["state"])
            return self.best["epoch"]
        return self.train.epochs

    def _train_metrics(self, chosen: int) -> dict:
        epochs, secs = self.train.epochs, self.train_seconds
        lengths = self.lengths if self.max_len is None else np.minimum(self.lengths, self.max_len)
        real_tokens = int(lengths.sum())
        epoch = next(h for h in self.history if h["epoch"] == chosen)
        metrics = {
            **{k: v for k, v in epoch.items() if k.startswith("validation_")},
            "selected_epoch": chosen,
            "train_seconds": secs,
            "validation_seconds": self.val_seconds,
            "model_load_seconds": self.load_seconds,
            "warm_start": self.warm,
            "train_samples_per_second": len(self.lengths) * epochs / secs if secs else None,
            "train_tokens_per_second": real_tokens * epochs / secs if secs else None,
            "trainable_params": int(self.trainable),
            "total_params": int(self.total),
            "trainable_percent": 100.0 * self.trainable / self.total if self.total else None,
            "steps": self.total_steps,
            "micro_batch_size": self.micro,
            "resumed_from_epoch": self.start_epoch or None,
            "precision": self.precision_name(),
            "base_dtype": self.base_dtype_name(),
            "optimizer": self.train.optimizer,
            "gradient_checkpointing": self.checkpointing,
            "memory_plan": self.memory_plan,
            "attention_mask": self.mask_mode,
            "packing": "on" if self.arch is not None else self.packing_off,
            "layer_norms": self.layer_norms,
            "score_scale": self.score_scale,
            "packing_token_saving": self.packing_saving,
            "pad_to_multiple_of": self.pad_multiple,
            "compile": self.compiled,
            "cuda_graphs": self.graphs.summary() if self.graphs is not None else self.graphs_off,
            "layers_4bit": sum(type(m).__module__.startswith("bitsandbytes.") for m in self.model.modules()),
        }
        flops_tok = model_flops_per_token(_base_config(self.model), float(self.lengths.mean()))
        metrics["train_model_flops"] = flops_tok * real_tokens * epochs
        if self.dev_type == "cuda":
            import torch

            peak = peak_flops(torch.cuda.get_device_name())
            metrics["mfu"] = (
                metrics["train_model_flops"] / secs / (peak * self.world) if peak and secs else None
            )
        return metrics

    def precision_name(self) -> str:
        if self.amp is None:
            return "fp32"
        return "fp16-autocast, loss scaling" if self.scaler is not None else f"{str(self.amp)[6:]}-autocast"

    def base_dtype_name(self) -> str:
        """The dtype of the frozen weights (all weights for full fine-tuning), as loaded."""
        frozen = [p.dtype for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()]
        dtype = frozen[0] if frozen else next(self.model.parameters()).dtype
        return str(dtype).replace("torch.", "")

    def _test(self, metrics: dict) -> dict:
        """Test predictions and metrics, once, on rank 0 of final runs only."""
        if not (self.spec.evaluate_test and self.rank == 0):
            return {}
        sync(self.device)
        t = time.perf_counter()
        logits = self.logits("test")
        sync(self.device)
        metrics["eval_seconds"] = time.perf_counter() - t
        preds = predict(self.spec.task, logits)
        scores = score(self.spec.task, self.tok.labels["test"], preds, self.n_labels)
        metrics.update({f"test_{k}": v for k, v in scores.items()})
        metrics["eval_samples_per_second"] = (
            len(preds) / metrics["eval_seconds"] if metrics["eval_seconds"] else None
        )
        write_predictions(
            self.run_dir / "predictions.parquet",
            self.spec.runtime.test_rows_file,
            logits,
            self.tok.label_names,
            self.spec.task,
        )
        return {"predictions": preds.tolist(), "logits": logits}

    def _unshard(self) -> None:
        """A sharded run's trained weights gathered whole (every process joins) into a plain model on rank 0,
        which scores the test split, saves a normal Hugging Face / PEFT folder and reload-checks it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from .models import build_model
        from .norms import bf16_layer_norms, chosen

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=opts)
        if self.rank != 0:
            return
        names = self.tok.label_names
        model, _ = build_model(self.spec, names, self.device, self.total_steps, self.amp)
        model.load_state_dict(full)
        if chosen(self.layer_norms) == "bf16":
            bf16_layer_norms(model)
        self.model = model

    def _gather_memory(self, metrics: dict) -> None:
        """Memory is per device: keep each process's peaks, headline the largest."""
        import torch.distributed as dist

        keys = (
            "peak_memory_allocated_mb",
            "peak_memory_reserved_mb",
            "peak_device_memory_mb",
            "peak_host_rss_mb",
        )
        per: list = [None] * self.world
        dist.all_gather_object(per, {k: metrics[k] for k in keys})
        metrics["per_process"] = per
        for k in keys:
            vals = [p[k] for p in per if p[k] is not None]
            metrics[k] = max(vals) if vals else None

    def _save(self, metrics: dict, test: dict) -> tuple[str | None, dict | None]:
        """The artefact's files, once written (the save began before the test pass), and its reload check.
        The save's phase is what the run waited for: the host copy, and the writing the test did not hide."""
        if self.saving is None:  # a trial
            return None, None
        t = time.perf_counter()
        written, self.saving = self.saving, None  # it holds the model, which the reload check frees
        artefact = written()
        del written
        self.phases["save"] += time.perf_counter() - t
        metrics["adapter_size_mb"] = dir_size_mb(self.run_dir / artefact)
        if not (self.spec.evaluate_test and self.spec.runtime.verify_reload):
            return artefact, None
        t = time.perf_counter()
        self._release_training()  # the reloaded copy needs the room (two 8B bases exceed a 24 GB budget)
        reload = verify_reload(self.as_trained(), self.run_dir, self.device, test["logits"], self.rescore)
        self.phases["reload_check"] = time.perf_counter() - t
        return artefact, reload

    def as_trained(self) -> RunSpec:
        """The run's spec with its `auto` choices that a reloaded model must repeat made: the layer norms."""
        from .norms import chosen

        return self.spec.with_train(layer_norms=chosen(self.layer_norms))

    def _release_training(self) -> None:
        """Free the trained model and what only training needed (optimizer state, gradients, the best epoch's
        copy, the CUDA graphs) once the model is scored and saved."""
        import gc

        import torch

        self.optimizer = self.scheduler = self.graphs = self.model = self.fwd = self.arch = None
        self.params, self.grad_params, self.best["state"] = [], [], None
        gc.collect()
        if self.dev_type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ plan
    def plan_summary(self) -> dict:
        """What `peftbench plan` prints for this run: the fit and the time it would take (estimated from
        the probe's seconds per token at the longest shape, over this run's tokens per epoch as its
        batches compute them, padded or packed)."""
        plan = dict(self.memory_plan or {})
        step_s, micro = plan.get("step_seconds"), plan.get("micro_batch_size")
        epoch_s = None
        if step_s and micro:
            longest = np.argsort(-self.lengths, kind="stable")[:micro]  # the probe's batch
            epoch_s = step_s / self._tokens(longest) * sum(self._tokens(b) for b in self._epoch_parts(micro))
        plan.update(
            epoch_seconds=epoch_s,
            run_seconds=epoch_s * self.train.epochs if epoch_s else None,
            base_dtype=self.base_dtype_name(),
            optimizer=self.train.optimizer,
            model_load_seconds=self.load_seconds,
            trainable_params=int(self.trainable),
        )
        return plan

    def _epoch_parts(self, micro: int) -> list[np.ndarray]:
        """The first epoch's (micro-)batches, as train_epoch makes them."""
        rng = np.random.default_rng([self.spec.seed, 0])
        batches = make_batches(self.lengths, self.batch_size, rng, self.train.group_by_length)
        return [b[i : i + micro] for b in batches for i in range(0, len(b), micro)]

    def _tokens(self, items: np.ndarray) -> int:
        """Tokens a (micro-)batch of these items computes: padded to its longest, or one packed row."""
        lengths = np.minimum(self.lengths[items], self.max_len or 1 << 30)
        packed = self.arch is not None
        return packing.batch_tokens(lengths, self.pack_multiple if packed else self.pad_multiple, packed)


def _base_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "base_model"):
        cfg = model.base_model.model.config
    return cfg
