"""Execute one planned run and write its result.json: `python -m peftbench.worker RUN_DIR`.

Whatever happens inside the run, a result is written: `success`, `skipped` (cannot run here, or does not
fit the GPU memory budget, with the reason), `oom` (out of memory even at the smallest micro-batch),
`diverged` (the training loss became NaN or infinite) or `failed` (with the error). A spec with `plan_only`
writes `plan.json` instead: the memory plan and time estimate of `peftbench plan`. On an
out-of-memory error the run is retried with half the micro-batch and twice the accumulation (the
same effective batch), down to a floor.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import faults, store
from .devices import is_oom
from .errors import Diverged, SkipRun, UserError, silent_interrupt
from .metrics import TASK_METRICS
from .spec import RunSpec

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "numpy",
    "scikit-learn",
    "peftbench",
)


def environment(device: str) -> dict:
    """The machine, packages and commit a run ran on (read once per process: a warm worker runs many)."""
    import copy

    return copy.deepcopy(_environment(device))


@functools.cache
def _environment(device: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "worker": os.environ.get("PEFTBENCH_WORKER", "process"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_mps_pipe_directory": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),  # a client of that MPS daemon
        "packages": {},
    }
    for p in PACKAGES:
        try:
            env["packages"][p] = version(p)
        except PackageNotFoundError:
            env["packages"][p] = None
    try:
        import torch

        env["device"] = (
            torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
        )
        env["cuda"] = torch.version.cuda
    except Exception:
        env["device"] = device
    src = Path(__file__).resolve().parent
    try:
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
        env["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "."],
                cwd=src,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def base_result(spec: RunSpec) -> dict:
    return {
        "schema": store.SCHEMA,
        "run_id": spec.runtime.run_id,
        "study": spec.study,
        "method": spec.method,
        "label": spec.label,
        "role": spec.role,
        "seed": spec.seed,
        "learning_rate": spec.learning_rate,
        "status": None,
        "error": None,
        "config_hash": spec.config_hash,
        "config": spec.to_dict(),
        "metrics": {},
        "history": [],
        "splits": {  # which split each metric was measured on
            **{f"{split}_{m}": split for m in TASK_METRICS[spec.task] for split in ("test", "validation")},
            **{f"history.validation_{m}": "validation" for m in TASK_METRICS[spec.task]},
            "history.train_loss": "train",
        },
        "started_at": time.time(),
        "finished_at": None,
        # The machine's 1-minute load when the run started, beside its cores: timings from a loaded machine.
        "load": {"start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cpus": os.cpu_count()},
    }


def _run_with_retries(spec: RunSpec, run_dir: Path, progress: bool, attempts: list[dict]) -> dict:
    import torch

    from .data import Tokenized
    from .tfidf import tfidf_run
    from .train import train_run

    if spec.method == "tfidf":
        import numpy as np

        d = json.loads(Path(spec.runtime.texts_file).read_text())
        return tfidf_run(
            spec, d["texts"], {k: np.array(v) for k, v in d["labels"].items()}, spec.label_names, run_dir
        )
    t = time.perf_counter()
    tok = Tokenized.load(Path(spec.runtime.tokens_file))
    data_seconds = time.perf_counter() - t
    micro = spec.train.micro_batch_size or spec.train.batch_size
    for attempt in range(spec.runtime.max_oom_retries + 1):
        try:
            out = train_run(spec.with_train(micro_batch_size=micro), tok, run_dir, progress=progress)
            if "phase_seconds" in out["metrics"]:
                out["metrics"]["phase_seconds"]["data_load"] = data_seconds
            attempts.append({"micro_batch_size": micro, "outcome": "success"})
            out["attempts"] = list(attempts)
            return out
        except Exception as e:
            if not is_oom(e):
                raise
            attempts.append({"micro_batch_size": micro, "outcome": "out of memory"})
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if micro == 1 or attempt == spec.runtime.max_oom_retries:
                raise
            micro = max(1, micro // 2)
    raise AssertionError("unreachable")


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as torchrun sets them ((0, 1) otherwise)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def execute_plan(run_dir: Path, spec: RunSpec) -> dict:
    """The memory plan of one run (`peftbench plan`), written to RUN_DIR/plan.json."""
    from .data import Tokenized
    from .train import plan_run

    plan = {"run_id": spec.runtime.run_id, "label": spec.label, "method": spec.method, "status": "planned"}
    try:
        plan.update(plan_run(spec, Tokenized.load(Path(spec.runtime.tokens_file)), run_dir))
    except SkipRun as e:
        plan.update(status="does not fit" if "does not fit" in str(e) else "skipped", error=str(e))
    except Exception as e:  # a UserError too: the plan records it and the others go on
        plan.update(
            status="failed",
            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            if str(e).strip()
            else type(e).__name__,
        )
    store.atomic_write_json(run_dir / "plan.json", plan)
    return plan


def execute_run(run_dir: Path, progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    spec = RunSpec.from_dict(json.loads((run_dir / "spec.json").read_text()))
    if spec.runtime.plan_only:
        return execute_plan(run_dir, spec)
    rank, world = rank_world()
    if world > 1 and spec.runtime.device.startswith("cuda"):
        spec = spec.with_runtime(device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    result = base_result(spec)
    attempts: list[dict] = []
    faults.at_start(spec.runtime.run_id)
    try:
        out = _run_with_retries(spec, run_dir, progress, attempts)
        result.update(
            status="paused" if out.get("paused") else "success",
            metrics=out["metrics"],
            history=out["history"],
            artefact=out["artefact"],
            reload_check=out["reload_check"],
            attempts=out.get("attempts"),
            test_predictions=out["test_predictions"],
        )
        if out["test_predictions"] is not None:
            result["test_labels_fingerprint"] = spec.data_fingerprint
    except SkipRun as e:
        result.update(status="skipped", error=str(e))
    except Diverged as e:
        result.update(status="diverged", error=str(e), history=e.history, metrics=e.metrics)
    except UserError as e:
        result.update(status="failed", error=str(e))
    except Exception as e:
        oom = is_oom(e)
        result.update(
            status="oom" if oom else "failed",
            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            attempts=attempts or None,
        )
        (run_dir / "error.log").write_text(traceback.format_exc())
    result["config"]["micro_batch_size_used"] = (attempts or [{}])[-1].get("micro_batch_size")
    import torch

    result["environment"] = environment(spec.runtime.device)
    result["environment"]["torch_threads"] = torch.get_num_threads()  # per run: a warm worker's change
    result["finished_at"] = time.time()
    result["load"]["end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if rank == 0:
        store.atomic_write_json(run_dir / "result.json", result)
    if world > 1 and result["status"] != "success":
        sys.exit(1)  # let torchrun stop the other processes instead of leaving them in a collective
    return result


def die_with_parent() -> None:
    """On Linux, this process is killed when its parent dies: the CLI, or the forkserver, which exits when the
    CLI does. A CLI killed by any signal leaves no worker writing on into its study folder."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()  # not "is it 1": the CLI itself may be PID 1 in a container
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above: nobody is waiting for this run
        os._exit(1)


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


def main() -> None:
    die_with_parent()
    rank, world = rank_world()
    _quiet()
    if world > 1:  # launched by torchrun for `gpus_per_run` > 1
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _execute_logged(Path(sys.argv[1]), rank)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def serve(conn, default_threads: int) -> None:
    """A warm-trial worker (runner.WarmWorker): each (run folder, torch threads) received on `conn`, run in
    turn with that many threads (None: `default_threads`, torch's own) and answered once its result is
    written; None ends it. The threads follow the runs at once, which change from rung to rung."""
    import torch

    die_with_parent()
    _quiet()
    while (message := conn.recv()) is not None:
        run_dir, threads = message
        torch.set_num_threads(threads or default_threads)
        _execute_logged(Path(run_dir), 0)
        conn.send(run_dir)


def _execute_logged(run_dir: Path, rank: int) -> None:
    """One run, a segmentation fault's stack left in its crash.log for the parent to report."""
    log = run_dir / ("crash.log" if rank == 0 else f"crash-rank{rank}.log")
    with open(log, "w") as crash:
        faulthandler.enable(file=crash)
        with silent_interrupt():
            execute_run(run_dir, progress=os.environ.get("PEFTBENCH_PROGRESS", "1") == "1")
        faults.at_end(run_dir.name)
        faulthandler.disable()
    if log.stat().st_size == 0:
        log.unlink()


if __name__ == "__main__":
    main()
