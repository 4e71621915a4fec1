"""CUDA graphs of training steps, recorded per batch shape without a compiler."""

from __future__ import annotations

import contextlib
import time

from .spec import TrainSettings

# Graphs pay where the host's kernel launches bound a micro-step, and only there: where a micro-step's GPU
# work is large they buy no speed and cost memory. Measured by parameters x tokens of a micro-step's longest
# shape, on an H200 (benchmarks/results/h200-scale-8b.json): at 7.2e9 x 16 x 512 (the 8B shape at
# micro-batch 16) graphs doubled peak reserved memory (LoRA 125 GB against 59 GB) for 44 samples/s against
# 43.6 without them; at 7.2e9 x 2 x 512 graphed micro-steps trained LoRA at 39.8 samples/s against a plain
# eager loop's 13.4-14.2, with 3% more reserved memory.
GRAPHS_MAX_WORK = 8e12
# Multi-tensor gradient adds (`backward_adding_in_few_kernels`) hold every fresh gradient until the backward
# pass ends: up to the gradients' size more memory at its peak. On roberta-base (0.5 GB of fp32 gradients)
# the activations freed during the backward pass made room for them: the same peak, 5,319 MB
# (benchmarks/results/h200-grad-adds.json). Their gain is in kernel count, which matters where kernels are
# small; large gradients are added by large kernels either way. So: up to this many bytes of gradients, and
# not under a GPU memory budget, whose plan did not count them.
FEW_ADDS_MAX_BYTES = 2 * 2**30


class StepGraphs:
    """A training (micro-)step's forward, backward and loss sum as CUDA graphs, one per batch shape; with
    the gradient clipping too where a step is one micro-step (without gradient accumulation).

    Small models at batch 16 are bound by the host launching kernels one at a time (the GPU idles most of
    each eager step: benchmarks/results/profiles). A graph replays a whole step's kernels in one launch.
    Shapes
    are few because batches are padded to multiples of `pad_multiple`; each is recorded the first time it
    occurs (after one eager micro-step, which creates the gradients), with no compiler:
    0.1-0.2 s per shape in a fresh process on the H200 (benchmarks/results/h200-end-to-end.json). The
    optimizer and scheduler step stay eager (a few fused kernels), so the optimisation is unchanged.
    Gradients, the loss sum and each shape's input buffers live outside the graphs; the graphs' activations
    share one memory pool (they never run at the same time). A micro-step's share of its batch is the
    device scalar `weight`, set before each replay, so micro-steps of any share replay one graph; their
    gradients add up in the gradient tensors, as eagerly.
    """

    def __init__(
        self,
        loss_of,
        amp,
        loss_sum,
        params: list,
        max_grad_norm,
        budgeted: bool = False,
        model=None,
        accumulating: bool = False,
        compiled: bool = False,
        optimizer=None,
    ):
        import torch

        self.loss_of, self.amp, self.loss_sum = loss_of, amp, loss_sum
        self.params, self.max_grad_norm, self.accumulating = params, max_grad_norm, accumulating
        self.gradient_adds = gradient_adds(sum(p.numel() * p.element_size() for p in params), budgeted)
        # A step of one micro-step writes its gradients over the last step's (no zeroing pass between steps)
        self.overwrites = self.gradient_adds == "multi-tensor" and not accumulating
        # Clipping's scale, applied by the optimizer's own kernel where it divides by a `grad_scale`
        self.clip_scale = None
        if max_grad_norm and folds_clipping(optimizer):
            self.clip_scale = torch.ones((), device=loss_sum.device)
        self.copies, self.weight_copies = weight_copies(model, amp, self.gradient_adds)
        self.weight = torch.ones((), device=loss_sum.device)
        self.stream = torch.cuda.Stream()
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.eager_steps = 0
        # Compiled layers (`compile: blocks`) recompile on a new shape: never inside a capture, so each shape
        # runs once eagerly first (the graphs of compiled code then replay what it compiled).
        self.warm_first, self.warmed = compiled, set()
        self.failed: str | None = None
        self.capture_seconds = 0.0
        # Starting the graphs: the first eager micro-step and the captures. Paid once per process: a run
        # resumed in a new process pays it again, a run trained on in one process does not.
        self.start_seconds = 0.0

    @staticmethod
    def unsupported(
        train: TrainSettings,
        method,
        device: str,
        world: int,
        micro: int,
        mask_mode: str,
        prefixed: bool,
        compiled,
        checkpointing: bool = False,
        work: float = 0.0,
        scaled: bool = False,
    ) -> str | None:
        """Why this run's steps cannot be graphed (None: they can)."""
        if not train.cuda_graphs:
            return "off (cuda_graphs: false)"
        reasons = [
            (not device.startswith("cuda"), "not a CUDA device"),
            (world > 1, "data-parallel run"),
            (bool(compiled), "torch.compile'd run"),
            (prefixed or method.graph_blocker is not None, method.graph_blocker or "prefix tuning"),
            (checkpointing, "gradient checkpointing"),
            (scaled, "fp16 loss scaling (its overflow check reads the gradients on the host)"),
            (
                work > GRAPHS_MAX_WORK,
                f"a micro-step of {work:.1e} parameters x tokens (graphs pay up to {GRAPHS_MAX_WORK:.0e}: "
                "beyond, the GPU bounds the step, and the graphs' memory pool doubled reserved memory)",
            ),
            (mask_mode == "2d", "2D attention mask (the model syncs on it)"),  # "packed": none
        ]
        return next((why for bad, why in reasons if bad), None)

    def forward_backward(self, *batch) -> None:
        """The micro-step's work, eager or under capture: loss (times its share `weight`), gradients, loss
        sum, and clipping where one micro-step is the whole step (`max_grad_norm` given)."""
        import torch

        # Autocast's weight-cast cache must not outlive a capture; each weight is cast once per step anyway.
        with self._autocast(), self.copies.in_place() if self.copies else contextlib.nullcontext():
            loss = self.loss_of(*batch) * self.weight
        if self.gradient_adds == "multi-tensor":
            filled = {id(w) for w in self.copies.weights} if self.copies else set()
            backward_adding_in_few_kernels(loss, self.params, overwrite=self.overwrites, filled_after=filled)
        else:
            loss.backward()
        if self.copies:
            self.copies.gradients_into_weights(add=self.accumulating)
        self.loss_sum += loss.detach()
        if self.clip_scale is not None:
            clipping_scale(
                [p.grad for p in self.params if p.grad is not None], self.max_grad_norm, self.clip_scale
            )
        elif self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    @property
    def clipping(self) -> str:
        """Where a graphed step's gradient clipping happens."""
        if self.clip_scale is not None:
            return "in the optimizer's kernel"
        return (
            "a pass of its own"
            if self.max_grad_norm
            else "not in the graphs (none, or after the micro-steps)"
        )

    def optimizer_step(self, optimizer) -> None:
        """`optimizer.step()`, dividing the gradients by this step's clipping scale inside its own kernel
        where it can (the `grad_scale` that torch's GradScaler hands a fused optimizer): the same update as
        `clip_grad_norm_`'s multiplication, without its pass over every gradient."""
        if self.clip_scale is not None:
            optimizer.grad_scale = self.clip_scale
        try:
            optimizer.step()
        finally:
            vars(optimizer).pop("grad_scale", None)

    def step(self, batch: tuple) -> bool:
        """Run the step from its shape's graph (recorded now if new). False: the caller runs it eagerly."""
        if self.failed or not self.eager_steps:
            return False
        key = shape_key(batch)
        if self.warm_first and key not in self.graphs and key not in self.warmed:
            return False  # run eagerly first (`run`), outside any capture
        entry = self.graphs.get(key) or self._capture(batch, key)
        if entry is None:
            return False
        graph, static = entry
        for buf, new in zip(static, batch):
            buf.copy_(new, non_blocking=True)
        graph.replay()
        return True

    def run(self, *batch, weight: float = 1.0) -> None:
        """One micro-step's forward and backward on host tensors (pinned), its loss weighted by its share
        of the batch: from a graph, or eagerly."""
        self.weight.fill_(weight)
        if self.step(batch):
            return
        first = not (self.eager_steps or self.failed)  # the step before any capture (timed: it syncs)
        t = time.perf_counter()
        dev = self.loss_sum.device
        batch = tuple(x.to(dev, non_blocking=True) for x in batch)
        if first and self.copies and not self.copies.same_loss(self.loss_of, batch, self._autocast):
            self.copies, self.weight_copies = None, COPIES_CHANGE_LOSS
        self.forward_backward(*batch)
        self.eager_steps += 1
        if self.warm_first:  # its compiled layers have seen this shape: it may be captured next time
            self.warmed.add(shape_key(batch))
        if first:
            import torch

            torch.cuda.synchronize(dev)
            self.start_seconds += time.perf_counter() - t

    def _autocast(self):
        import torch

        return torch.autocast(
            "cuda", dtype=self.amp or torch.float32, enabled=self.amp is not None, cache_enabled=False
        )

    def _capture(self, batch: tuple, key: tuple):
        import torch

        t = time.perf_counter()
        dev = self.loss_sum.device
        static = tuple(x.to(dev, copy=True) for x in batch)  # captured on this step's real batch
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:  # the eager steps' cached activations go back, for the graphs' pool to take
            torch.cuda.empty_cache()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(*([self.pool] if self.pool is not None else []))
                try:
                    self.forward_backward(*static)
                finally:
                    graph.capture_end()
        except Exception as e:  # the run goes on eagerly, and its metrics say why
            self.failed = (
                f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            )
            torch.cuda.synchronize()
            release_generator()
            return None
        torch.cuda.current_stream().wait_stream(self.stream)
        self.pool = graph.pool() if self.pool is None else self.pool
        self.graphs[key] = (graph, static)
        took = time.perf_counter() - t
        self.capture_seconds += took
        self.start_seconds += took
        return self.graphs[key]

    def summary(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "capture_seconds": self.capture_seconds,
            "eager_steps": self.eager_steps,
            "failed": self.failed,
            "gradient_adds": self.gradient_adds,
            "weight_copies": self.weight_copies,
            "clipping": self.clipping,
        }


def release_generator() -> None:
    """Free the CUDA random generator from a capture that failed before its end, with an empty capture that
    ends cleanly. Left as it is, the generator goes on counting offsets for that graph, and the next eager
    random op (dropout) in the process raises "Offset increment outside graph capture encountered
    unexpectedly" (torch 2.11 on an H100, 2026-12-06): the run, and every later run in its process, fails."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The CUDA Graph is empty")
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass


def shape_key(batch: tuple) -> tuple:
    """What a step's graph is recorded and looked up by: its batch tensors' shapes."""
    return tuple(tuple(x.shape) for x in batch)


def clipping_scale(grads: list, max_norm: float, out) -> None:
    """What `clip_grad_norm_` divides the gradients by, into the scalar tensor `out`: max(1, (their total
    norm + 1e-6) / max_norm), with no host synchronisation (it may be captured in a graph)."""
    import torch

    torch.clamp((torch.nn.utils.get_total_norm(grads) + 1e-6) / max_norm, min=1.0, out=out)


def folds_clipping(optimizer) -> bool:
    """Whether gradient clipping's scaling can go into `optimizer`'s step: torch's fused optimizers divide
    the gradients by a `grad_scale` tensor set on them (GradScaler's contract), and torch >= 2.6 computes
    the total norm on its own (`get_total_norm`)."""
    import torch

    return bool(
        optimizer is not None
        and getattr(optimizer, "_step_supports_amp_scaling", False)
        and optimizer.defaults.get("fused")
        and hasattr(torch.nn.utils, "get_total_norm")
    )


def gradient_adds(grad_bytes: int, budgeted: bool) -> str:
    """How a graphed step adds its gradients into the kept ones: "multi-tensor" (a few kernels), or one add
    per parameter, with the reason (FEW_ADDS_MAX_BYTES)."""
    if budgeted:
        return "per parameter: under a GPU memory budget"
    if grad_bytes > FEW_ADDS_MAX_BYTES:
        return (
            f"per parameter: {grad_bytes / 2**30:.1f} GB of gradients "
            f"(multi-tensor up to {FEW_ADDS_MAX_BYTES / 2**30:.0f} GB)"
        )
    return "multi-tensor"


def backward_adding_in_few_kernels(
    loss, params: list, overwrite: bool = False, filled_after=frozenset()
) -> None:
    """`loss.backward()`, its gradients added into the parameters' existing ones by a few multi-tensor
    kernels rather than one add per parameter; with `overwrite`, copied over them, and a gradient the
    backward pass left none for zeroed (unless its parameter's id is in `filled_after`: the caller fills
    it), so that no pass zeroes the gradients between steps.

    Autograd adds a fresh gradient into an existing `.grad` with one kernel per parameter (roberta-base:
    250 a step, 1.0 ms of a 15-ms graphed step on an H200, benchmarks/README.md), but takes the fresh
    tensor itself, with no kernel, where `.grad` is None. So the existing gradients are set aside, the
    backward pass leaves fresh ones, and `torch._foreach_add_` adds those in, per dtype. The gradient
    tensors the optimizer reads stay the same objects (CUDA graphs write into them); the fresh ones are
    temporaries, in a graph's memory pool under capture."""
    import torch

    kept = list({id(p): (p, p.grad) for p in params if p.grad is not None}.values())  # a tied one once
    for p, _ in kept:
        p.grad = None
    try:
        loss.backward()
        by_dtype: dict = {}
        for p, g in kept:
            if p.grad is not None:
                into, fresh = by_dtype.setdefault(g.dtype, ([], []))
                into.append(g)
                fresh.append(p.grad)
        for into, fresh in by_dtype.values():
            (torch._foreach_copy_ if overwrite else torch._foreach_add_)(into, fresh)
        unused = [g for p, g in kept if p.grad is None and id(p) not in filled_after]
        if overwrite and unused:
            torch._foreach_zero_(unused)
    finally:
        for p, g in kept:
            p.grad = g


COPIES_CHANGE_LOSS = "off: the loss changed with bf16 weights in place (the model casts by a weight's dtype)"


def weight_copies(model, amp, adds: str) -> tuple[WeightCopies | None, str]:
    """bf16 copies of the trained linear layers' fp32 weights for a graphed step to compute with, where the
    step runs under bf16 autocast and adds its gradients in a few kernels; else None, with the reason."""
    import torch

    if amp is not torch.bfloat16:
        return None, "off: no bf16 autocast"
    if adds != "multi-tensor":
        return None, f"off: gradients added {adds}"
    copies = WeightCopies(model) if model is not None else None
    if not copies:
        return None, "off: no trained fp32 linear weights"
    return copies, f"on: {len(copies.weights)} tensors"


class WeightCopies:
    """bf16 copies of the trained fp32 weights and biases of a model's linear layers, which a graphed step
    computes with in their place.

    Under bf16 autocast a linear layer casts its fp32 weight and bias to bf16 at every use, a kernel per
    tensor, and autograd casts each bf16 gradient back to fp32 before it is added into the kept gradient,
    another (roberta-base: 0.75 and 1.07 ms of a 15.6-ms graphed step on an H200, benchmarks/README.md).
    With the copies in the layers' places, one multi-tensor copy refreshes them from the fp32 weights at
    the start of each micro-step, and the bf16 gradients autograd leaves on them go into the fp32 ones by
    one multi-tensor copy (a step of one micro-step) or an add per tensor (micro-steps adding up). The
    values are autocast's: the same bf16 roundings of the same weights, the same fp32 gradients. The
    optimizer, checkpoints and saved models see only the fp32 weights: the copies stand in inside a step."""

    def __init__(self, model):
        import torch

        self.model = model
        places: dict[int, list] = {}
        self.weights: list = []
        for module in model.modules():
            if type(module) is not torch.nn.Linear:  # subclasses (4-bit layers) may re-cast their weights
                continue
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and p.dtype == torch.float32:
                    if id(p) not in places:
                        self.weights.append(p)
                    places.setdefault(id(p), []).append((module, name))
        self.places = [places[id(p)] for p in self.weights]
        self.copies = [torch.nn.Parameter(torch.empty_like(p, dtype=torch.bfloat16)) for p in self.weights]

    def __len__(self) -> int:
        return len(self.weights)

    @contextlib.contextmanager
    def in_place(self):
        """The copies, refreshed from the weights, in the layers' places; the weights back after."""
        import torch

        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.weights)
        self._put(self.copies)
        try:
            yield
        finally:
            self._put(self.weights)

    def _put(self, tensors: list) -> None:
        for t, places in zip(tensors, self.places):
            for module, name in places:
                setattr(module, name, t)

    def gradients_into_weights(self, add: bool) -> None:
        """The copies' bf16 gradients into the weights' fp32 ones: added, or (one micro-step a step)
        copied, a weight whose copy got none zeroed; the copies are left without gradients, for the next
        backward pass to leave fresh ones."""
        import torch

        pairs = [(w, c.grad) for w, c in zip(self.weights, self.copies) if c.grad is not None]
        for w, _ in pairs:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
        if pairs:
            into, fresh = [w.grad for w, _ in pairs], [g for _, g in pairs]
            (torch._foreach_add_ if add else torch._foreach_copy_)(into, fresh)
        stale = [w.grad for w, c in zip(self.weights, self.copies) if c.grad is None and w.grad is not None]
        if stale and not add:  # copied over, so a weight this step left no gradient gets zero
            torch._foreach_zero_(stale)
        for c in self.copies:
            c.grad = None

    def same_loss(self, loss_of, batch: tuple, autocast) -> bool:
        """Whether the model computes the same loss with the copies in place (as it does where only autocast
        reads its linear weights), in eval mode. A model that casts its activations by a weight's dtype
        does not."""
        import torch

        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast():
                plain = loss_of(*batch).float()
                with self.in_place():
                    copied = loss_of(*batch).float()
        finally:
            self.model.train(was)
        return bool(torch.allclose(plain, copied, rtol=1e-5, atol=0.0))
