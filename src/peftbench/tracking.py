"""What a run reports while it trains: live tracking (TensorBoard) and a step profile (torch.profiler)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from .devices import sync
from .errors import UserError
from .spec import RunSpec


class Tracker:
    """Optional live tracking (study option `tracking: tensorboard` or `tracking: mlflow`), through the tools'
    own writers: TensorBoard event files in RUN_DIR/tensorboard, or an MLflow run in the study's local store
    STUDY/mlruns (one experiment per study, one MLflow run per peftbench run, its spec's key values as
    params).

    Every `tracking_every` steps it logs the mean loss since the last point, the learning rate, samples/s,
    real tokens/s and (on CUDA) allocated memory. Off by default: reading the loss costs a host sync.
    """

    def __init__(self, spec: RunSpec | None, run_dir: Path, device: str):
        """`spec` None: no tracking (a data-parallel run tracks in its first process only)."""
        self.every = spec.runtime.tracking_every if spec else 10
        self.device = device
        self.writer = {"tensorboard": _TensorBoard, "mlflow": _MLflow}.get(spec and spec.runtime.tracking)
        if self.writer is not None:
            self.writer = self.writer(spec, Path(run_dir))
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
            for key, value in record.items():
                if key.startswith("validation_"):  # the task's metrics, validation/accuracy and the like
                    self.writer.add_scalar(f"validation/{key[len('validation_') :]}", value, epoch)
            self.writer.add_scalar("train/epoch_loss", record["train_loss"], epoch)
            self.last_loss = 0.0  # the loss accumulator restarts each epoch: steps before it were logged
            self.n_steps = 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _TensorBoard:
    def __init__(self, spec: RunSpec, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "tracking: tensorboard needs the tensorboard package; pip install 'peftbench[tracking]'"
            ) from None
        self.w = SummaryWriter(str(run_dir / "tensorboard"))

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.w.add_scalar(name, value, step)

    def close(self) -> None:
        self.w.close()


class _MLflow:
    """MLflow's client on the study's local file store (offline; MLflow keeps that store in maintenance
    mode and asks for MLFLOW_ALLOW_FILE_STORE to use it)."""

    def __init__(self, spec: RunSpec, run_dir: Path):
        import os

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError(
                "tracking: mlflow needs the mlflow-skinny package; pip install 'peftbench[tracking]'"
            ) from None
        self.client = MlflowClient(tracking_uri=mlflow_uri(run_dir.parent.parent))
        name = str(spec.study or "peftbench")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=spec.runtime.run_id).info.run_id
        params = {
            "method": spec.method,
            "label": spec.label,
            "seed": spec.seed,
            "learning_rate": spec.learning_rate,
            "config_hash": spec.config_hash,
        }
        for k, v in params.items():
            self.client.log_param(self.run_id, k, v)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, name, float(value), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_uri(study_dir: Path) -> str:
    """Where a study's MLflow runs are: STUDY/mlruns, as a file URI (`mlflow ui --backend-store-uri` takes
    it)."""
    return (Path(study_dir).resolve() / "mlruns").as_uri()


class StepProfiler:
    """Where a training step's time goes (`profile: true` in the study, or `--profile`: RUN_DIR/profile.json).

    Profiles steps [20, 50) of the first epoch (fewer in short epochs) with torch.profiler and writes the file
    (JSON): wall time per step, GPU kernel time and kernels per step (busy fraction = how far the GPU is kept
    fed), host synchronisations, the GPU kernel time by kind of work (`kernel_kind`), and the top operators
    by host time and by device time.
    """

    def __init__(self, device: str, n_steps: int, path: Path | None):
        self.path = path
        self.start = min(20, n_steps // 4)  # after warm-up; short epochs profile what they have
        self.stop, self.device = self.start + max(1, min(30, n_steps - self.start - 1)), device
        self.prof = self.t0 = None

    def tick(self, i: int) -> None:
        if not self.path:
            return
        import torch

        if i == self.start:
            sync(self.device)
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.startswith("cuda"):
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif i == self.stop and self.prof is not None:
            sync(self.device)
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.write(wall, self.stop - self.start)
            self.prof, self.path = None, None

    def write(self, wall: float, n: int) -> None:
        import json

        ev = self.prof.key_averages()

        def dev_us(e):
            return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0

        rows = [
            {
                "op": e.key,
                "calls": e.count,
                "host_ms": e.self_cpu_time_total / 1e3 / n,
                "device_ms": dev_us(e) / 1e3 / n,
            }
            for e in ev
        ]
        syncs = sum(
            e.count
            for e in ev
            if e.key
            in (
                "cudaStreamSynchronize",
                "cudaDeviceSynchronize",
                "cudaMemcpyAsync",
                "aten::item",
                "aten::_local_scalar_dense",
            )
        )
        on_gpu = [e for e in ev if is_kernel(e)]
        by_kind: dict[str, float] = {}
        for e in on_gpu:
            kind = kernel_kind(e.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + dev_us(e) / 1e3 / n
        kernels = sum(by_kind.values())
        out = {
            "steps": n,
            "wall_ms_per_step": 1e3 * wall / n,
            "gpu_kernel_ms_per_step": kernels,
            "gpu_kernels_per_step": sum(e.count for e in on_gpu) / n,
            "gpu_busy_fraction": kernels / (1e3 * wall / n) if wall else None,
            "host_sync_like_calls_per_step": syncs / n,
            "gpu_kernel_ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_host": sorted(rows, key=lambda r: -r["host_ms"])[:25],
            "top_device": sorted(rows, key=lambda r: -r["device_ms"])[:25],
        }
        Path(self.path).write_text(json.dumps(out, indent=1))


# What CUPTI records on the GPU's timeline that is no kernel: the host waiting for room in the launch queue,
# and the profiler's own buffers.
NOT_KERNELS = ("Command Buffer Full", "Activity Buffer Request", "Buffer Flush")


def is_kernel(event) -> bool:
    """Whether a profiler event (of `key_averages`) is GPU kernel time: on a CUDA device, neither a user
    annotation's range on the GPU's timeline (the optimizer's `Optimizer.step#...`, which spans the kernels it
    launches, so counting it counts them twice) nor one of CUPTI's markers."""
    return (
        "CUDA" in str(event.device_type)
        and not getattr(event, "is_user_annotation", False)
        and event.key not in NOT_KERNELS
    )


# What a GPU kernel does, read from its name (cuBLAS, cuDNN, torch's own and Inductor's Triton kernels): the
# first pattern that matches, so fused kernels count where their first-listed part is (Inductor's
# "dropout_backward_sum" as dropout).
KERNEL_KINDS = [
    ("attention", r"sdpa|flash|fmha|attention|cudnn::fusion|unpack_cudnn"),
    ("matrix products", r"gemm|nvjet|cutlass|xmma|cublas|wgmma|splitk|triton_tem"),
    ("optimizer step", r"adam|FusedOptimizer"),
    ("gradient norm", r"LpNorm"),
    ("normalization", r"layer_norm|rms_norm|GammaBeta|layernorm|rmsnorm"),
    ("dropout", r"dropout"),
    ("activation", r"gelu|silu|swiglu|tanh|relu"),
    ("multi-tensor copies and adds", r"multi_tensor_apply"),
    ("copies and casts", r"copy|convert|cast"),
    ("fills", r"fill|memset|zero"),
    ("embeddings", r"embedding|segment|index|sort"),
    ("reductions", r"reduce|red_fused|sum"),
    ("other elementwise", r"elementwise|poi_fused|triton_"),
]


def kernel_kind(name: str) -> str:
    """The kind of work (KERNEL_KINDS) a GPU kernel of this name does; "other" where no pattern matches."""
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.I)), "other")
