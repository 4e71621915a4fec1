"""Devices: which device a run gets, its precisions, its peak FLOP/s, and its memory as it decides an OOM."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import UserError

GPU_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cpu" and not re.fullmatch(r"cuda(:\d+)?", requested):
        raise UserError(f"device: must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return requested


MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_DEFAULT_PIPES = Path("/tmp/nvidia-mps")  # where clients look for a daemon without CUDA_MPS_PIPE_DIRECTORY


@contextlib.contextmanager
def mps_daemon():
    """NVIDIA's Multi-Process Service while the block runs, so that processes sharing a GPU run their kernels
    side by side instead of taking turns on it. Yields what the environment of a process needs to be its
    client: {} where a daemon already serves this user (CUDA_MPS_PIPE_DIRECTORY set, or NVIDIA's default
    folder in use). Otherwise the daemon is started with its pipes and log in a temporary folder, and quit
    and its folder removed when the block ends. A CUDA process that cannot reach a daemon runs without it."""
    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or (MPS_DEFAULT_PIPES / "control").exists():
        yield {}
        return
    if shutil.which(MPS_CONTROL) is None:
        raise UserError(
            f"mps: {MPS_CONTROL} is not on PATH (it comes with NVIDIA's driver utilities); install them, "
            f"or leave out --mps"
        )
    folder = tempfile.mkdtemp(prefix="peftbench-mps-")
    pipes = {"CUDA_MPS_PIPE_DIRECTORY": folder, "CUDA_MPS_LOG_DIRECTORY": folder}
    env = {**os.environ, **pipes}
    started = subprocess.run(
        [MPS_CONTROL, "-d"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if started.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        why = (started.stderr or started.stdout).strip().splitlines() or [f"exit status {started.returncode}"]
        raise UserError(f"mps: `{MPS_CONTROL} -d` failed: {why[0]}; leave out --mps")
    try:
        yield pipes
    finally:  # the daemon quits its server once the last client has gone
        subprocess.run([MPS_CONTROL], input="quit\n", env=env, capture_output=True, text=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def autocast_dtype(precision: str, device: str):
    """The dtype matrix products run in under autocast, or None for fp32. `auto` on a GPU: bf16, or fp16
    (with loss scaling) on GPUs without bf16 (before Ampere: T4, V100)."""
    import torch

    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:  # CPUs with native bf16 (AVX512-BF16 / AMX) gain ~1.5x from autocast; others lose.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except Exception:
        return None


def autocast(device: str, amp):
    """torch's autocast on `device`'s type to `amp` (`autocast_dtype`), off where `amp` is None."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None)


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside `torchrun`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in device_name), None)


def cuda_index(device: str = "cuda") -> int:
    """The CUDA index of `device` ("cuda" alone: the current device), as torch's per-device calls need it."""
    import torch

    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def outside_allocator(device: str = "cuda") -> tuple[int, str]:
    """Bytes this process holds on its GPU beyond the caching allocator's reserve (the CUDA context, cuBLAS
    and cuDNN workspaces), and whose figure that is: NVML's for this process ("this process") where NVML
    lists it, so that other processes on the GPU (a study's parallel runs) do not count; otherwise the
    device's whole use less this reserve ("whole device"), exact when the process is alone on the GPU."""
    import torch

    index = cuda_index(device)
    reserved = torch.cuda.memory_reserved(index)
    mine = process_memory(processes_on(index), os.getpid())
    if mine is not None:
        return max(0, mine - reserved), "this process"
    free, total = torch.cuda.mem_get_info(index)
    return max(0, (total - free) - reserved), "whole device"


def processes_on(index: int) -> list | None:
    """NVML's list of the compute processes on the GPU of CUDA index `index`, or None where NVML cannot
    tell (no nvidia-ml-py, no driver access, a GPU it cannot match)."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except Exception:  # NVML is a bonus: any failure falls back to the device's whole figure
        return None


def process_memory(processes: list | None, pid: int) -> int | None:
    """The GPU memory NVML lists for `pid`, or None when it does not list it (a container's own process
    ids differ from the host's NVML sees) or hides the figure."""
    for p in processes or []:
        if p.pid == pid and isinstance(p.usedGpuMemory, int):
            return p.usedGpuMemory
    return None


class MemoryMeter:
    """Peak GPU memory of one run: allocated (tensors, above what the process held when the run started),
    reserved (all the caching allocator held: what an OOM is decided on) and the device's figure for this
    process (as nvidia-smi shows it: the CUDA context and libraries' workspaces included; see
    `outside_allocator`). On the CPU: the process's peak RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base_allocated = 0
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base_allocated = torch.cuda.memory_allocated()

    def peaks(self) -> dict:
        """Peak figures in MB (2^20 bytes) since the baseline."""
        out = {
            "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_allocated_mb": None,
            "peak_memory_reserved_mb": None,
            "peak_device_memory_mb": None,
        }
        if not self.cuda:
            return out
        import torch

        # What the process holds beyond the allocator's reserve (context, cuBLAS workspaces), now: added to
        # the reserve's peak it is the device's figure at that peak.
        outside, scope = outside_allocator()
        out.update(
            peak_memory_allocated_mb=(torch.cuda.max_memory_allocated() - self.base_allocated) / 2**20,
            peak_memory_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
            peak_device_memory_mb=(torch.cuda.max_memory_reserved() + outside) / 2**20,
            device_memory_scope=scope,
        )
        return out
