"""Fault injection for tests of crash isolation, OOM retry and resume (off unless the variable is set).

PEFTBENCH_INJECT_FAULT="<text in run id>:<fault>", faults:
  segv                  the worker dies with a segmentation fault as the run starts
  hang                  the worker sleeps for ten minutes as the run starts (for the orphan test)
  exit_after_epoch=N    the worker is killed (os._exit) right after epoch N, and its checkpoint where one is
                        due (`checkpoint_every_seconds: 0`: after every epoch)
  exit_at_end           the worker exits with status 255 after writing its result (a failing shutdown)
  oom_above=N           every training step with a micro-batch above N raises torch.OutOfMemoryError
  ray_task_dies_once    the Ray actor's process exits before starting the run's worker, the first time only
"""

from __future__ import annotations

import os


def _active(run_id: str, spec: str | None = None) -> tuple[str, str] | None:
    spec = spec if spec is not None else os.environ.get("PEFTBENCH_INJECT_FAULT")
    if not spec or ":" not in spec:
        return None
    where, fault = spec.split(":", 1)
    return (fault.split("=")[0], fault.split("=")[1] if "=" in fault else "") if where in run_id else None


def at_start(run_id: str) -> None:
    f = _active(run_id)
    if f and f[0] == "segv":
        import ctypes

        ctypes.string_at(0)  # a real segmentation fault
    if f and f[0] == "hang":
        import time

        time.sleep(600)


def after_epoch(run_id: str, epoch: int) -> None:
    f = _active(run_id)
    if f and f[0] == "exit_after_epoch" and epoch == int(f[1]):
        os._exit(137)


def at_end(run_id: str) -> None:
    f = _active(run_id)
    if f and f[0] == "exit_at_end":
        os._exit(255)


def before_step(run_id: str, micro_batch: int) -> None:
    f = _active(run_id)
    if f and f[0] == "oom_above" and micro_batch > int(f[1]):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected by PEFTBENCH_INJECT_FAULT)")


def in_ray_task(run_dir: str, spec: str | None) -> None:
    f = _active(run_dir, spec)
    marker = os.path.join(run_dir, ".ray-task-died")
    if f and f[0] == "ray_task_dies_once" and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
