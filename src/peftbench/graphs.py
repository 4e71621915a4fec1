"""CUDA graphs of training steps, recorded per batch shape without a compiler."""

from __future__ import annotations

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

    def __init__(self, loss_of, amp, loss_sum, params: list, max_grad_norm, budgeted: bool = False):
        import torch

        self.loss_of, self.amp, self.loss_sum = loss_of, amp, loss_sum
        self.params, self.max_grad_norm = params, max_grad_norm
        self.gradient_adds = gradient_adds(sum(p.numel() * p.element_size() for p in params), budgeted)
        self.weight = torch.ones((), device=loss_sum.device)
        self.stream = torch.cuda.Stream()
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.eager_steps = 0
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
        with torch.autocast(
            "cuda", dtype=self.amp or torch.float32, enabled=self.amp is not None, cache_enabled=False
        ):
            loss = self.loss_of(*batch) * self.weight
        if self.gradient_adds == "multi-tensor":
            backward_adding_in_few_kernels(loss, self.params)
        else:
            loss.backward()
        self.loss_sum += loss.detach()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self, batch: tuple) -> bool:
        """Run the step from its shape's graph (recorded now if new). False: the caller runs it eagerly."""
        if self.failed or not self.eager_steps:
            return False
        key = tuple(tuple(x.shape) for x in batch)
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
        self.forward_backward(*(x.to(dev, non_blocking=True) for x in batch))
        self.eager_steps += 1
        if first:
            import torch

            torch.cuda.synchronize(dev)
            self.start_seconds += time.perf_counter() - t

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
        }


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


def backward_adding_in_few_kernels(loss, params: list) -> None:
    """`loss.backward()`, its gradients added into the parameters' existing ones by a few multi-tensor
    kernels rather than one add per parameter.

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
            torch._foreach_add_(into, fresh)
    finally:
        for p, g in kept:
            p.grad = g
