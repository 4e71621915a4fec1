"""Devices: which device a run gets, its precisions, its peak FLOP/s, and its memory as it decides an OOM."""

from __future__ import annotations

import re
import resource

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


class MemoryMeter:
    """Peak GPU memory of one run: allocated (tensors, above what the process held when the run started),
    reserved (all the caching allocator held: what an OOM is decided on) and the device's own figure
    (cudaMemGetInfo, as nvidia-smi
    shows it: the CUDA context and libraries' workspaces included). On the CPU: the process's peak RSS."""

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

        free, total = torch.cuda.mem_get_info()
        # What the device holds beyond the allocator's reserve (context, cuBLAS workspaces), now: added to
        # the reserve's peak it is the device's figure at that peak.
        outside = max(0, (total - free) - torch.cuda.memory_reserved())
        out.update(
            peak_memory_allocated_mb=(torch.cuda.max_memory_allocated() - self.base_allocated) / 2**20,
            peak_memory_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
            peak_device_memory_mb=(torch.cuda.max_memory_reserved() + outside) / 2**20,
        )
        return out
