"""One run: build the model, train it with an explicit loop, evaluate, measure, save, verify the reload.

The loop is written out (as PEFT's own method comparison does) so every cost is visible and can be
measured: length-bucketed batches padded only to their own longest item, bf16 autocast where the
hardware has it, a fused AdamW, no host synchronisation inside an epoch, and the test set
evaluated once, sorted by length. Schedulers come from transformers, adapters from PEFT.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from . import faults
from . import methods as registry
from .data import Tokenized

GPU_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


# ----------------------------------------------------------------------------------------- batching
def make_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                 group_by_length: bool) -> list[np.ndarray]:
    """A random epoch of batches; with grouping, items of similar length share a batch (less padding).

    Grouping sorts within shuffled windows of 50 batches and then shuffles the batches, like
    transformers' length-grouped sampler: every item is still seen once per epoch in random company.
    """
    n = len(lengths)
    perm = rng.permutation(n)
    if not group_by_length:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    window = batch_size * 50
    batches = []
    for start in range(0, n, window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(seqs: list[np.ndarray], pad_id: int, multiple: int = 8, max_len: int | None = None):
    """(input_ids, attention_mask) as int64 tensors padded to the longest item (rounded up to `multiple`)."""
    import torch
    if max_len is not None:
        seqs = [s[:max_len] for s in seqs]
    longest = max(len(s) for s in seqs)
    width = int(math.ceil(longest / multiple) * multiple)
    if max_len is not None:
        width = min(width, max(max_len, longest))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _active_peft_config(model):
    cfgs = getattr(model, "peft_config", None)
    return cfgs.get(getattr(model, "active_adapter", "default")) if isinstance(cfgs, dict) else None


def prefix_length(model) -> int:
    """Number of prefix positions when `model` is a prefix-tuning PEFT model, else 0."""
    cfg = _active_peft_config(model)
    return cfg.num_virtual_tokens if cfg is not None and str(cfg.peft_type).endswith("PREFIX_TUNING") else 0


def model_forward(model, ids, mask, mask_mode: str = "2d", labels=None):
    """One forward pass of the classifier on (ids, 2D padding mask).

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
    mask = torch.cat([mask.new_ones(ids.shape[0], n_prefix), mask], dim=1)
    return base(input_ids=ids, attention_mask=mask, **{cache_arg: cache}, **kw)


@functools.lru_cache(maxsize=None)
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


def choose_mask_mode(model, seqs: list[np.ndarray], pad_id: int, device: str, probe_on_cpu: bool = False,
                     max_len: int | None = None) -> str:
    """Which attention-mask form this model takes without changing its output, checked on real inputs.

    On CUDA, a 4D mask (bidirectional for encoders, causal for decoders) is used when the model's logits with
    it equal those with the plain 2D mask on a padded batch; any difference or error keeps the 2D mask (eager
    attention that adds masks, prompt methods that extend the mask, architectures with their own masking).
    On the CPU the synchronisation costs nothing: always 2D.
    """
    import torch
    forced = os.environ.get("PEFTBENCH_MASK_MODE")  # benchmarks compare the forms; not a study option
    if forced:
        return forced
    if (not device.startswith("cuda") and not probe_on_cpu) or len(seqs) < 2 or prefix_length(model):
        return "2d"
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    order = np.argsort(lengths, kind="stable")  # the shortest, the median and the longest of the whole split
    pick = [seqs[order[0]], seqs[order[len(order) // 2]], seqs[order[-1]]]
    if len({len(s) for s in pick}) == 1:
        return "2d"
    # Full length (local-attention windows must show up), within the run's limit (soft prompts take positions).
    ids, mask = collate(pick, pad_id, multiple=8, max_len=max_len)
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    chosen = "2d"
    try:  # any failure here only means: keep the 2D mask
        with torch.inference_mode():
            ref = model_forward(model, ids, mask).logits.float()
            for mode in ("4d-bidirectional", "4d-causal"):
                try:
                    out = model_forward(model, ids, mask, mode).logits.float()
                except Exception:
                    continue
                if out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-3, atol=1e-3):
                    chosen = mode
                    break
    except Exception:
        chosen = "2d"
    finally:
        model.train(was_training)
    return chosen


# ----------------------------------------------------------------------------------------- devices
def resolve_device(requested: str) -> str:
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from .errors import UserError
        raise UserError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return requested


def autocast_dtype(precision: str, device: str):
    import torch
    if precision == "fp32":
        return None
    if device.startswith("cuda"):
        return torch.bfloat16 if (precision == "bf16" or torch.cuda.is_bf16_supported()) else None
    if precision == "bf16":
        return torch.bfloat16
    try:  # CPUs with native bf16 (AVX512-BF16 / AMX) gain ~1.5x from autocast; others lose.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except Exception:
        return None


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- evaluation
def predict_logits(model, seqs: list[np.ndarray], batch_size: int, device: str, amp, pad_id: int,
                   max_len: int | None = None, mask_mode: str = "2d") -> np.ndarray:
    """Logits for `seqs`, evaluated in length-sorted batches (little padding), returned in input order.

    On CUDA, widths are rounded to multiples of 64: every new shape costs kernel selection, more than the
    padding saves (benchmarks/results/h200-padding.json)."""
    import torch
    multiple = 64 if device.startswith("cuda") else 8
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    out = [None] * len(order)
    model.eval()
    chunks = []
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            ids, mask = collate([seqs[j] for j in idx], pad_id, multiple=multiple, max_len=max_len)
            logits = model_forward(model, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                                   mask_mode).logits
            chunks.append((idx, logits.float()))
    for idx, logits in chunks:
        arr = logits.cpu().numpy()
        for k, j in enumerate(idx):
            out[j] = arr[k]
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> float:
    f1s = []
    for c in range(num_labels):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


# ----------------------------------------------------------------------------------------- helpers
def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def model_flops_per_token(config, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (the usual MFU convention)."""
    h = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    inter = getattr(config, "intermediate_size", 4 * h)
    if not h or not layers:
        return 0.0
    n_params = layers * (4 * h * h + 2 * h * inter)
    return 6 * n_params + 12 * layers * h * seq_len


def _peak_flops(device_name: str) -> float | None:
    return next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in device_name), None)


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state: dict) -> None:
    import torch
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _param_groups(model, lr: float, head_lr: float | None, weight_decay: float, head: list[str]):
    """AdamW groups: no decay for biases and norms (as transformers' Trainer), optional head learning rate."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name.lower()
        is_head = head_lr is not None and any(f"{h}." in name or name.startswith(h + ".") for h in head)
        groups.setdefault((decay, is_head), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": head_lr if is_head else lr}
            for (decay, is_head), ps in groups.items()]


class Tracker:
    """Optional live tracking through TensorBoard's own writer (study option `tracking: tensorboard`).

    Every `tracking_every` steps it logs the mean loss since the last point, the learning rate, samples/s,
    real tokens/s and (on CUDA) allocated memory. Off by default: reading the loss costs a host sync.
    """

    def __init__(self, run: dict, run_dir: Path, device: str):
        self.writer = None
        self.every = run.get("tracking_every", 10)
        self.device = device
        if run.get("tracking") == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from .errors import UserError
                raise UserError("tracking: tensorboard needs the tensorboard package; pip install "
                                "'peftbench[tracking]'") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.last_loss = 0.0
        self.samples = self.tokens = self.n_steps = 0
        self.t0 = time.perf_counter()

    def step(self, step: int, loss_sum, batch, lengths, max_len: int | None, scheduler) -> None:
        if self.writer is None:  # off: nothing computed on the hot path
            return
        self.samples += len(batch)
        self.tokens += int(np.minimum(lengths[batch], max_len or 1 << 30).sum())
        self.n_steps += 1
        if step % self.every:
            return
        import torch
        total = float(loss_sum.item())  # the one host sync, every `every` steps
        dt = time.perf_counter() - self.t0
        w = self.writer
        w.add_scalar("train/loss", (total - self.last_loss) / self.n_steps, step)  # mean since the last point
        w.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], step)
        w.add_scalar("train/samples_per_second", self.samples / dt, step)
        w.add_scalar("train/tokens_per_second", self.tokens / dt, step)
        if self.device.startswith("cuda"):
            w.add_scalar("memory/allocated_mb", torch.cuda.memory_allocated() / 2**20, step)
        self.last_loss, self.samples, self.tokens, self.n_steps = total, 0, 0, 0
        self.t0 = time.perf_counter()

    def epoch(self, epoch: int, record: dict) -> None:
        if self.writer is not None:
            self.writer.add_scalar("validation/accuracy", record["validation_accuracy"], epoch)
            self.writer.add_scalar("train/epoch_loss", record["train_loss"], epoch)
            self.last_loss = 0.0  # the loss accumulator restarts each epoch: steps before it were logged
            self.n_steps = 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepProfiler:
    """Where a training step's time goes (env PEFTBENCH_PROFILE=FILE; off otherwise).

    Profiles steps [20, 50) of the first epoch (fewer in short epochs) with torch.profiler and writes FILE (JSON): wall time per step,
    GPU kernel time per step (busy fraction = how far the GPU is kept fed), host synchronisations, and the
    top operators by host time and by device time.
    """

    def __init__(self, device: str, n_steps: int):
        self.path = os.environ.get("PEFTBENCH_PROFILE")
        self.start = min(20, n_steps // 4)  # after warm-up; short epochs profile what they have
        self.stop, self.device = self.start + max(1, min(30, n_steps - self.start - 1)), device
        self.prof = self.t0 = None

    def tick(self, i: int) -> None:
        if not self.path:
            return
        import torch
        if i == self.start:
            _sync(self.device)
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.startswith("cuda"):
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif i == self.stop and self.prof is not None:
            _sync(self.device)
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.write(wall, self.stop - self.start)
            self.prof, self.path = None, None

    def write(self, wall: float, n: int) -> None:
        import json
        ev = self.prof.key_averages()

        def dev_us(e):
            return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0
        rows = [{"op": e.key, "calls": e.count, "host_ms": e.self_cpu_time_total / 1e3 / n,
                 "device_ms": dev_us(e) / 1e3 / n} for e in ev]
        syncs = sum(e.count for e in ev if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                     "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense"))
        kernels = sum(dev_us(e) for e in ev if e.device_type is not None and "CUDA" in str(e.device_type)) / 1e3 / n
        out = {"steps": n, "wall_ms_per_step": 1e3 * wall / n, "gpu_kernel_ms_per_step": kernels,
               "gpu_busy_fraction": kernels / (1e3 * wall / n) if wall else None,
               "host_sync_like_calls_per_step": syncs / n,
               "top_host": sorted(rows, key=lambda r: -r["host_ms"])[:25],
               "top_device": sorted(rows, key=lambda r: -r["device_ms"])[:25]}
        Path(self.path).write_text(json.dumps(out, indent=1))


class StepGraphs:
    """A training step's forward, backward, loss sum and gradient clipping as CUDA graphs, one per batch shape.

    Small models at batch 16 are bound by the host launching kernels one at a time (the GPU idles most of
    each eager step: benchmarks/results/profiles). A graph replays a whole step's kernels in one launch. Shapes
    are few because batches are padded to multiples of `pad_multiple`; each is recorded the first time it
    occurs (after one eager step, which creates the gradients and the optimizer state), with no compiler:
    0.1-0.2 s per shape in a fresh process on the H200 (benchmarks/results/h200-end-to-end.json). The
    optimizer and scheduler step stay eager (a few fused kernels), so the optimisation is unchanged.
    Gradients, the loss sum and each shape's input buffers live outside the graphs; the graphs' activations
    share one memory pool (they never run at the same time).
    """

    def __init__(self, model, mask_mode: str, amp, loss_sum, params: list, max_grad_norm):
        import torch
        self.model, self.mask_mode, self.amp, self.loss_sum = model, mask_mode, amp, loss_sum
        self.params, self.max_grad_norm = params, max_grad_norm
        self.stream = torch.cuda.Stream()
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.eager_steps = 0
        self.failed: str | None = None
        self.capture_seconds = 0.0

    @staticmethod
    def unsupported(run: dict, method, device: str, world: int, micro: int, batch_size: int, mask_mode: str,
                    prefixed: bool, compiled) -> str | None:
        """Why this run's steps cannot be graphed (None: they can)."""
        if not run["train"].get("cuda_graphs", True):
            return "off (cuda_graphs: false)"
        reasons = [(not device.startswith("cuda"), "not a CUDA device"), (world > 1, "data-parallel run"),
                   (bool(compiled), "torch.compile'd run"), (micro < batch_size, "gradient accumulation"),
                   (prefixed, "prefix tuning"), (bool(method.step_hook), "per-step hook (AdaLoRA)"),
                   (mask_mode == "2d", "2D attention mask (the model syncs on it)")]
        return next((why for bad, why in reasons if bad), None)

    def forward_backward(self, ids, mask, y) -> None:
        """The step's work, eager or under capture: loss, gradients, loss sum, clipping."""
        import torch
        # Autocast's weight-cast cache must not outlive a capture; each weight is cast once per step anyway.
        with torch.autocast("cuda", dtype=self.amp or torch.float32, enabled=self.amp is not None,
                            cache_enabled=False):
            loss = model_forward(self.model, ids, mask, self.mask_mode, labels=y).loss
        loss.backward()
        self.loss_sum += loss.detach()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self, ids, mask, y) -> bool:
        """Run the step from its shape's graph (recorded now if new). False: the caller runs it eagerly."""
        if self.failed or not self.eager_steps:
            return False
        key = (tuple(ids.shape), tuple(y.shape))
        entry = self.graphs.get(key) or self._capture(ids, mask, y, key)
        if entry is None:
            return False
        graph, static = entry
        for buf, new in zip(static, (ids, mask, y)):
            buf.copy_(new, non_blocking=True)
        graph.replay()
        return True

    def run(self, ids, mask, y) -> None:
        """One step's forward and backward on host tensors (pinned): from a graph, or eagerly."""
        if not self.step(ids, mask, y):
            dev = self.loss_sum.device
            self.forward_backward(*(x.to(dev, non_blocking=True) for x in (ids, mask, y)))
            self.eager_steps += 1

    def _capture(self, ids, mask, y, key):
        import torch
        t = time.perf_counter()
        dev = self.loss_sum.device
        static = tuple(torch.zeros(x.shape, dtype=x.dtype, device=dev) for x in (ids, mask, y))
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(*([self.pool] if self.pool is not None else []))
                try:
                    self.forward_backward(*static)
                finally:
                    graph.capture_end()
        except Exception as e:  # the run goes on eagerly, and its metrics say why
            self.failed = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            torch.cuda.synchronize()
            return None
        torch.cuda.current_stream().wait_stream(self.stream)
        self.pool = graph.pool() if self.pool is None else self.pool
        self.graphs[key] = (graph, static)
        self.capture_seconds += time.perf_counter() - t
        return self.graphs[key]

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "capture_seconds": self.capture_seconds,
                "eager_steps": self.eager_steps, "failed": self.failed}


# ----------------------------------------------------------------------------------------- the run
def train_run(run: dict, tok: Tokenized, run_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate one run; returns the `metrics`, `history` and artefact info for result.json.

    A checkpoint after each epoch (`checkpoint.pt`) lets a killed run resume where it stopped.
    """
    import torch

    from . import _peft  # noqa: F401  first: transformers' scheduler module imports peft, which imports bitsandbytes
    from transformers import get_scheduler  # noqa: I001

    from .models import build_model, count_params

    cfg = run["train"]
    device = run["device"]
    seed = run["seed"]
    rank, world = dist_info()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    phases: dict[str, float] = {}  # where the run's wall time goes, outside the timed training
    if device.startswith("cuda"):
        t = time.perf_counter()
        torch.zeros(1, device=device)  # the CUDA context: its cost is the run's, not the first step's
        phases["cuda_init"] = time.perf_counter() - t
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        mem_base = torch.cuda.memory_allocated()
    amp = autocast_dtype(cfg["precision"], device)
    dev_type = device.split(":")[0]

    lengths = tok.lengths("train")
    batch_size = cfg["batch_size"]
    micro = min(cfg.get("micro_batch_size") or batch_size, batch_size)
    steps_per_epoch = sum(math.ceil(len(lengths[i:i + batch_size * 50]) / batch_size)
                          for i in range(0, len(lengths), batch_size * 50)) if cfg["group_by_length"] \
        else math.ceil(len(lengths) / batch_size)
    total_steps = steps_per_epoch * cfg["epochs"]

    t_load = time.perf_counter()
    model, head = build_model(run, len(tok.label_names), tok.label_names, device, total_steps)
    load_seconds = time.perf_counter() - t_load
    if _mutated_init(model) and rank == 0:  # PiSSA & co: keep the initial adapter to convert the final one
        model.save_pretrained(run_dir / "adapter-init", safe_serialization=True)
    method = registry.get(run["method"])
    trainable, total = count_params(model)
    pad_id = run.get("pad_token_id") or 0
    max_len = run.get("effective_max_length")

    lr = cfg["learning_rate"]
    params = _param_groups(model, lr, cfg.get("head_learning_rate"), cfg["weight_decay"], head)
    fused = dev_type in ("cuda", "cpu")  # one kernel for all parameters (CPU: torch >= 2.4)
    optimizer = torch.optim.AdamW(params, lr=lr, fused=fused) if fused else torch.optim.AdamW(params, lr=lr)
    warmup = int(round(cfg["warmup_ratio"] * total_steps))
    scheduler = get_scheduler(cfg["scheduler"], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    t = time.perf_counter()
    mask_mode = choose_mask_mode(model, tok.ids["train"], pad_id, device, max_len=max_len)
    phases["mask_probe"] = time.perf_counter() - t
    fwd = model
    prefixed = prefix_length(model) > 0
    if prefixed and world > 1:
        from .errors import UserError
        raise UserError("prefix_tuning runs on one device here; set gpus_per_run: 1 for it")
    if world > 1:  # data parallel: each process takes every world-th item of each batch of `batch_size`
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(fwd, device_ids=[torch.device(device).index] if dev_type == "cuda" else None)
    compiled = False
    if cfg.get("compile") and not prefixed:
        # torch's default: the first shape compiles static, the first new shape recompiles with dynamic sizes;
        # "cudagraphs" adds CUDA graphs, recorded once per bucketed shape (few: see pad_multiple below), on one
        # device only (a data-parallel run compiles around DDP, without graphs).
        import torch._dynamo
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        graphs = cfg["compile"] == "cudagraphs" and world == 1 and dev_type == "cuda"
        fwd = torch.compile(fwd, mode="reduce-overhead" if graphs else None)
        compiled = "cudagraphs" if graphs else True
    graphs_off = StepGraphs.unsupported(run, method, device, world, micro, batch_size, mask_mode, prefixed,
                                        compiled)
    # Padding granularity. On the H200 (benchmarks/results/h200-padding.json) eager multiples of 8 - many
    # distinct shapes - ran 2.6-2.8x slower than multiples of 64 or fixed padding: there, each new shape costs
    # more than the padding saves. With CUDA graphs too (h200-graphs-roberta-padding.json): each new shape
    # costs a recording, and later epochs were as fast with multiples of 64 as of 16.
    # On the CPU, compute-bound, fine buckets pay. max_length means fixed padding.
    pad_multiple = cfg.get("pad_to_multiple_of") or (64 if cfg.get("compile") or dev_type == "cuda" else 8)

    history: list[dict] = []
    best = {"acc": -1.0, "epoch": None, "state": None}
    train_seconds = val_seconds = 0.0
    start_epoch = 0
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck.get("config_hash") == run["config_hash"]:
            _load_trainable(model, ck["trainable"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["rng"].cpu())
            history, train_seconds, val_seconds = ck["history"], ck["train_seconds"], ck["val_seconds"]
            start_epoch = ck["epoch"] + 1
            if ck.get("best_state") is not None:
                best = {"acc": ck["best_acc"], "epoch": ck["best_epoch"], "state": ck["best_state"]}

    real_tokens_epoch = int(lengths.sum()) if max_len is None else int(np.minimum(lengths, max_len).sum())
    ids_train = tok.ids["train"]
    labels_train = torch.from_numpy(tok.labels["train"])
    pin = dev_type == "cuda"
    bar = None
    if progress and rank == 0 and os.environ.get("PEFTBENCH_PROGRESS", "1") != "0":
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc=f"  {run['label']}",
                   unit="step", leave=False, dynamic_ncols=True)
    global_step = start_epoch * steps_per_epoch
    tracker = Tracker(run if rank == 0 else {}, run_dir, device)
    profiler = StepProfiler(device, steps_per_epoch)
    loss_sum = torch.zeros((), device=device)
    grad_params = [p for g in params for p in g["params"]]  # what gradient clipping rescales
    graphs = None
    if graphs_off is None:
        graphs = StepGraphs(model, mask_mode, amp, loss_sum, grad_params, cfg["max_grad_norm"])
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        rng = np.random.default_rng([seed, epoch])
        batches = make_batches(lengths, batch_size, rng, cfg["group_by_length"])
        loss_sum.zero_()
        _sync(device)
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            if epoch == start_epoch:
                profiler.tick(i)
            faults.before_step(run["run_id"], micro)
            if graphs is not None:  # one process, whole batch: forward, backward and clipping in one call
                ids, mask = collate([ids_train[j] for j in batch], pad_id, multiple=pad_multiple, max_len=max_len)
                graphs.run(ids.pin_memory(), mask.pin_memory(), labels_train[batch].pin_memory())
            else:
                mine, weight = batch[rank::world], 1.0
                if not len(mine):  # every process must join each gradient all-reduce, even with no item
                    mine, weight = batch[:1], 0.0
                for m0 in range(0, len(mine), micro):
                    part = mine[m0:m0 + micro]
                    ids, mask = collate([ids_train[j] for j in part], pad_id, multiple=pad_multiple, max_len=max_len)
                    y = labels_train[part]
                    if pin:
                        ids, mask, y = ids.pin_memory(), mask.pin_memory(), y.pin_memory()
                    with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
                        out = model_forward(fwd, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                                            mask_mode, labels=y.to(device, non_blocking=True))
                    # Weighted so that DDP's mean over processes gives the mean over the whole batch.
                    loss = out.loss * (len(part) / len(batch) * world * weight)
                    loss.backward()
                    loss_sum += loss.detach()
                if cfg["max_grad_norm"]:
                    torch.nn.utils.clip_grad_norm_(grad_params, cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            global_step += 1
            if method.step_hook:  # AdaLoRA reads the gradients to reallocate ranks: before zero_grad
                model.base_model.update_and_allocate(global_step)
            optimizer.zero_grad(set_to_none=graphs is None)  # the graphs write into the same gradient tensors
            tracker.step(global_step, loss_sum, batch, lengths, max_len, scheduler)
            if bar is not None:
                bar.update(1)
        _sync(device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            loss_sum /= world

        t1 = time.perf_counter()
        val_logits = predict_logits(model, tok.ids["validation"], cfg["eval_batch_size"], device, amp, pad_id,
                                    max_len, mask_mode)
        val_acc = float((val_logits.argmax(-1) == tok.labels["validation"]).mean())
        val_seconds += time.perf_counter() - t1
        history.append({"epoch": epoch + 1, "train_loss": float(loss_sum.item() / len(batches)),
                        "validation_accuracy": val_acc, "epoch_seconds": epoch_seconds,
                        "cumulative_train_seconds": train_seconds, "learning_rate": scheduler.get_last_lr()[0]})
        tracker.epoch(epoch + 1, history[-1])
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val=f"{val_acc:.3f}")
        if cfg["select_best_epoch"] and val_acc > best["acc"]:
            best = {"acc": val_acc, "epoch": epoch + 1, "state": {k: v.cpu() for k, v in _trainable_state(model).items()}}
        if run.get("checkpoint", True) and epoch + 1 < cfg["epochs"] and rank == 0:
            _save_checkpoint(ckpt_path, run, model, optimizer, scheduler, epoch, history, train_seconds,
                             val_seconds, best)
        faults.after_epoch(run["run_id"], epoch + 1)
    if bar is not None:
        bar.close()
    tracker.close()

    if cfg["select_best_epoch"] and best["state"] is not None:
        _load_trainable(model, {k: v.to(device) for k, v in best["state"].items()})
        chosen = best["epoch"]
    else:
        chosen = cfg["epochs"]
    chosen_val = next(h["validation_accuracy"] for h in history if h["epoch"] == chosen)

    metrics = {
        "validation_accuracy": chosen_val, "selected_epoch": chosen,
        "train_seconds": train_seconds, "validation_seconds": val_seconds, "model_load_seconds": load_seconds,
        "train_samples_per_second": len(lengths) * cfg["epochs"] / train_seconds if train_seconds else None,
        "train_tokens_per_second": real_tokens_epoch * cfg["epochs"] / train_seconds if train_seconds else None,
        "trainable_params": int(trainable), "total_params": int(total),
        "trainable_percent": 100.0 * trainable / total if total else None,
        "steps": total_steps, "micro_batch_size": micro, "resumed_from_epoch": start_epoch or None,
        "precision": "bf16-autocast" if amp is not None else "fp32", "attention_mask": mask_mode,
        "pad_to_multiple_of": pad_multiple, "compile": compiled,
        "cuda_graphs": graphs.summary() if graphs is not None else graphs_off,
        "layers_4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
    }
    flops_tok = model_flops_per_token(_base_config(model), float(lengths.mean()))
    metrics["train_model_flops"] = flops_tok * real_tokens_epoch * cfg["epochs"]
    if dev_type == "cuda":
        peak = _peak_flops(torch.cuda.get_device_name())
        metrics["mfu"] = (metrics["train_model_flops"] / train_seconds / (peak * world)) \
            if peak and train_seconds else None

    test = {}
    if run["evaluate_test"] and rank == 0:  # in data-parallel runs only rank 0 scores, saves and reports
        _sync(device)
        t2 = time.perf_counter()
        logits = predict_logits(model, tok.ids["test"], cfg["eval_batch_size"], device, amp, pad_id, max_len,
                                mask_mode)
        _sync(device)
        metrics["eval_seconds"] = time.perf_counter() - t2
        preds = logits.argmax(-1)
        metrics["test_accuracy"] = float((preds == tok.labels["test"]).mean())
        metrics["test_macro_f1"] = macro_f1(tok.labels["test"], preds, len(tok.label_names))
        metrics["eval_samples_per_second"] = len(preds) / metrics["eval_seconds"] if metrics["eval_seconds"] else None
        test = {"predictions": preds.tolist(), "logits": logits}

    if dev_type == "cuda":
        metrics["peak_memory_allocated_mb"] = (torch.cuda.max_memory_allocated() - mem_base) / 2**20
        metrics["peak_memory_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    else:
        metrics["peak_memory_allocated_mb"] = metrics["peak_memory_reserved_mb"] = None
    metrics["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["world_size"] = world
    if world > 1:  # memory is per device: keep each process's peaks, headline the largest
        import torch.distributed as dist
        keys = ("peak_memory_allocated_mb", "peak_memory_reserved_mb", "peak_host_rss_mb")
        per: list = [None] * world
        dist.all_gather_object(per, {k: metrics[k] for k in keys})
        metrics["per_process"] = per
        for k in keys:
            vals = [p[k] for p in per if p[k] is not None]
            metrics[k] = max(vals) if vals else None
        if rank != 0:  # rank 0 saves, verifies and reports
            return {"metrics": metrics, "history": history, "artefact": None, "reload_check": None,
                    "test_predictions": None}

    t = time.perf_counter()
    artefact = save_model(model, run, run_dir)
    phases["save"] = time.perf_counter() - t
    metrics["adapter_size_mb"] = dir_size_mb(run_dir / artefact)
    reload = None
    if run["evaluate_test"] and run.get("verify_reload", True):
        t = time.perf_counter()
        reload = verify_reload(run, run_dir, tok, test["logits"], device, amp, pad_id, max_len)
        phases["reload_check"] = time.perf_counter() - t
    metrics["phase_seconds"] = {**phases, "model_load": load_seconds, "train": train_seconds,
                                "validation": val_seconds, "test": metrics.get("eval_seconds", 0.0)}
    if ckpt_path.exists():
        ckpt_path.unlink()
    del model, fwd, optimizer
    return {"metrics": metrics, "history": history, "artefact": artefact, "reload_check": reload,
            "test_predictions": test.get("predictions")}


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside `torchrun`."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _base_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "base_model"):
        cfg = model.base_model.model.config
    return cfg


def _save_checkpoint(path, run, model, optimizer, scheduler, epoch, history, train_s, val_s, best) -> None:
    import torch
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config_hash": run["config_hash"], "epoch": epoch,
                "trainable": {k: v.cpu() for k, v in _trainable_state(model).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "train_seconds": train_s, "val_seconds": val_s,
                "best_acc": best["acc"], "best_epoch": best["epoch"], "best_state": best["state"]}, tmp)
    os.replace(tmp, path)


def _mutated_init(model) -> bool:
    """True for LoRA initialisations that change the base weights (PiSSA, OLoRA, CorDA)."""
    cfg = _active_peft_config(model)
    init = getattr(cfg, "init_lora_weights", None)
    return isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda"))


def save_model(model, run: dict, run_dir: Path) -> str:
    """Save the adapter (PEFT) or the model (others) with safetensors; returns the folder's name."""
    name = "adapter" if registry.get(run["method"]).kind == "peft" else "model"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kw = {}
    if _mutated_init(model):  # PEFT subtracts the initial adapter: a plain LoRA adapter on the original base
        kw["path_initial_model_for_weight_conversion"] = str(run_dir / "adapter-init")
    model.save_pretrained(tmp, safe_serialization=True, **kw)
    if kw:  # peft 0.21's conversion drops the modules_to_save (the head): put them back
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file
        f = tmp / "adapter_model.safetensors"
        converted = load_file(f)
        extra = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
                 if k not in converted and "lora_" not in k}
        save_file({**converted, **extra}, f, metadata={"format": "pt"})
    shutil.rmtree(run_dir / "adapter-init", ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return name


def verify_reload(run, run_dir, tok, logits, device, amp, pad_id, max_len) -> dict:
    """Reload the saved artefact through the same path as `peftbench predict` and compare test predictions."""
    from .predict import load_trained
    model = load_trained(run_dir, run=run, device=device)
    again = predict_logits(model, tok.ids["test"], run["train"]["eval_batch_size"], device, amp, pad_id, max_len)
    same = bool((again.argmax(-1) == logits.argmax(-1)).all())
    return {"identical_predictions": same, "max_abs_logit_diff": float(np.abs(again - logits).max()) if len(again) else 0.0}


def tfidf_run(run: dict, texts: dict, labels: dict, label_names: list[str], run_dir: Path) -> dict:
    """The classical floor: TF-IDF (1-2 grams) + logistic regression, measured like any other run."""
    import joblib
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    opts = run["method_options"]
    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, opts.get("ngram_max", 2)), min_df=2, sublinear_tf=True,
                        max_features=opts.get("max_features", 200_000)),
        LogisticRegression(C=opts.get("C", 1.0), max_iter=2000, random_state=run["seed"]))
    t0 = time.perf_counter()
    pipe.fit(texts["train"], labels["train"])
    train_s = time.perf_counter() - t0
    val_acc = float((pipe.predict(texts["validation"]) == labels["validation"]).mean())
    metrics = {"validation_accuracy": val_acc, "selected_epoch": None, "train_seconds": train_s,
               "train_samples_per_second": len(texts["train"]) / train_s, "train_tokens_per_second": None,
               "trainable_params": int(pipe[-1].coef_.size + pipe[-1].intercept_.size),
               "total_params": int(pipe[-1].coef_.size + pipe[-1].intercept_.size),
               "trainable_percent": 100.0, "precision": "fp64", "peak_memory_allocated_mb": None,
               "peak_memory_reserved_mb": None}
    preds = None
    if run["evaluate_test"]:
        t1 = time.perf_counter()
        preds = pipe.predict(texts["test"])
        metrics["eval_seconds"] = time.perf_counter() - t1
        metrics["test_accuracy"] = float((preds == labels["test"]).mean())
        metrics["test_macro_f1"] = macro_f1(labels["test"], preds, len(label_names))
        metrics["eval_samples_per_second"] = len(preds) / metrics["eval_seconds"]
    metrics["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (run_dir / "model").mkdir(exist_ok=True)
    joblib.dump(pipe, run_dir / "model" / "tfidf_logreg.joblib")
    metrics["adapter_size_mb"] = dir_size_mb(run_dir / "model")
    return {"metrics": metrics, "history": [{"epoch": 1, "train_loss": None, "validation_accuracy": val_acc,
                                             "epoch_seconds": train_s, "cumulative_train_seconds": train_s}],
            "artefact": "model", "reload_check": None,
            "test_predictions": preds.tolist() if preds is not None else None}

