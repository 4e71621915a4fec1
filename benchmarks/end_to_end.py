"""End to end: the starting study's four runs with the plain Trainer recipe vs `peftbench run --preset seed`.

    python benchmarks/end_to_end.py --model PATH --data DIR --out benchmarks/results/NAME.json [--parallel 4]

Both sides run the starting study's protocol on the same data: 3,000 train / 2,000 test IMDb reviews, max
length 512, batch 16, lr 2e-5, weight decay 0.01, 5 epochs (3 for LoRA), full / LoRA r16 q,k,v / QLoRA r8
q,v / IA3. (a) "trainer": in a process of its own, ended before (b) starts, for each method the model is
built, trained with transformers' Trainer (fp32, every review padded to 512) and scores the test set with
Trainer.predict; timed from the model load to the test predictions, after tokenizing once. (b) "peftbench":
the wall clock of the CLI command in a fresh process: reading and tokenizing the data, one process per run,
training, the test set, saving and the reload check of every artefact, and the report. With --parallel N,
(c) the same command with N runs sharing the GPU (`--parallel N --concurrent-finals`). With --seeds, every
run of both sides once per training seed (the accuracy check across seeds). With --mps, (d) the command of
(c) once more with its --mps: NVIDIA's Multi-Process Service runs for the study, so that the runs' kernels
can overlap on the GPU instead of taking turns.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def with_bytecode_cached(argv: list[str]) -> None:
    """Where this Python writes no bytecode (PYTHONDONTWRITEBYTECODE), each process compiles from source every
    module whose package shipped none. The rented H100 machines are such (their torch ships none): there the
    starting study's command took 37.1 s, and 26.1-27.3 s with bytecode cached (2026-12-07,
    `results/h100-bytecode-54fef75.json`). A pip install writes bytecode, so users do not pay that. So there
    this script first runs itself on 64 texts, untimed, with bytecode cached in a temporary folder, and then
    again, timed, with that cache: both sides alike. The folder is removed afterwards."""
    if not sys.flags.dont_write_bytecode:
        return
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache = tempfile.mkdtemp(prefix="bytecode-")
    warm = [*argv, "--train-size", "64", "--test-size", "64", "--out", f"{cache}/warm.json", "--keep", cache]
    done = subprocess.run([sys.executable, __file__, *warm], env=env, stdout=subprocess.DEVNULL)
    if done.returncode == 0:
        done = subprocess.run([sys.executable, __file__, *argv], env=env)
    shutil.rmtree(cache, ignore_errors=True)
    sys.exit(done.returncode)


if __name__ == "__main__":
    with_bytecode_cached(sys.argv[1:])  # before the imports below compile anything

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import speed  # noqa: E402
from peftbench import config, data as data_mod, stats  # noqa: E402
from peftbench.runner import PRELOAD, Study  # noqa: E402

IMPORTS = {
    "trainer": "import torch, transformers, peft; "
    "from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments",
    "peftbench": f"import importlib; [importlib.import_module(m) for m in {PRELOAD!r}]",
}


def import_seconds(code: str) -> float:
    """Wall seconds of `python -c CODE` in a fresh process (the interpreter's own start included)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    return time.perf_counter() - t0


def accuracy_check(trainer: dict, peftbench: dict, command: str = "peftbench") -> dict:
    """Per method, over the seeds both sides ran: each side's test accuracy (mean, 95% interval) and the
    paired difference peftbench - Trainer in points; `command` names the peftbench command compared."""
    seeds: dict[str, list[int]] = {}
    for key in trainer:
        method, _, seed = key.partition("/s")
        if seed:
            seeds.setdefault(method, []).append(int(seed))
    out = {}
    for method, its in sorted(seeds.items()):
        pairs = [
            (trainer[f"{method}/s{s}"]["test_accuracy"], peftbench.get(f"{method}/s{s}")) for s in sorted(its)
        ]
        pairs = [(t, p) for t, p in pairs if t is not None and p is not None]
        out[method] = {
            "seeds": len(pairs),
            "peftbench_command": command,
            "trainer": stats.mean_ci([t for t, _ in pairs], bounds=(0, 1)),
            "peftbench": stats.mean_ci([p for _, p in pairs], bounds=(0, 1)),
            "difference_points": stats.mean_ci([100 * (p - t) for t, p in pairs]),
            "per_seed_points": [round(100 * (p - t), 2) for t, p in pairs],
        }
    return out


def summary(rows: dict) -> dict:
    """Speed-ups against the Trainer recipe, and the floor under the sequential peftbench command."""
    trainer, imports = rows.get("trainer", {}).get("total_seconds"), rows.get("imports", {})
    out = {}
    for side in ("peftbench", "peftbench_parallel", "peftbench_parallel_mps"):
        if trainer and side in rows:
            secs = rows[side]["total_seconds"]
            out[side] = {
                "speedup": trainer / secs,
                "speedup_with_trainer_imports": (trainer + imports.get("trainer", 0)) / secs,
            }
    runs = rows.get("peftbench", {}).get("runs", {})
    if runs and "peftbench" in imports:
        steady = {
            k: float(np.median(r["epoch_seconds"][1:] or r["epoch_seconds"])) * len(r["epoch_seconds"])
            for k, r in runs.items()
        }
        out["floor"] = {
            "seconds": imports["peftbench"] + sum(steady.values()),
            "imports": imports["peftbench"],
            "steady_epochs": steady,
        }
    return out


def run_cli(
    args: list[str], out: Path, env: dict | None = None, timeout: float | None = None
) -> tuple[float, subprocess.CompletedProcess, list]:
    """`peftbench run ARGS --out OUT` in a fresh process (environment `env`, default this one's): its wall
    seconds, the process and the command. Past `timeout` seconds every process of the command (its forkserver
    and workers too) gets SIGABRT, on which faulthandler prints each thread's stack into the captured
    stderr."""
    cmd = [sys.executable, "-m", "peftbench", "run", *args, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env={**(env or os.environ), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        stdout, stderr = proc.communicate()
    return time.perf_counter() - t0, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), cmd


def peftbench_cli(model: str, data: str, out: Path, extra: list[str], timeout: float | None) -> dict:
    started = time.time()
    secs, proc, cmd = run_cli(
        ["--preset", "seed", "--model", model, "--data", data, *extra], out, timeout=timeout
    )
    return {
        "total_seconds": secs,
        "exit_status": proc.returncode,
        **study_details(out, started, started + secs),
        "command": " ".join(cmd[1:]),
        "stderr_tail": proc.stderr[-30000:] if proc.returncode else "",
    }


def study_details(out: Path, started: float, ended: float) -> dict:
    """What the study folder says: test accuracies, the study's own wall time, where its preparation's time
    went, and where each run's time went, with each run's place on the time line of the command that ran
    from `started` to `ended` (epoch seconds)."""
    runs = {}
    results = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/result.json"))]
    several = len({r["seed"] for r in results}) > 1
    for r in results:
        m = r.get("metrics") or {}
        runs[f"{r['label']}/s{r['seed']}" if several else r["label"]] = {
            "test_accuracy": m.get("test_accuracy"),
            "worker": (r.get("environment") or {}).get("worker"),
            "mps_client": bool((r.get("environment") or {}).get("cuda_mps_pipe_directory")),
            "run_seconds": (r.get("finished_at") or 0) - r["started_at"],
            "phase_seconds": m.get("phase_seconds"),
            "epoch_seconds": [h["epoch_seconds"] for h in r.get("history") or []],
            "train_samples_per_second": m.get("train_samples_per_second"),
            "cuda_graphs": m.get("cuda_graphs"),
            "started_after_seconds": r["started_at"] - started,
            "finished_before_end_seconds": ended - (r.get("finished_at") or r["started_at"]),
        }
    plan = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else {}
    return {
        "test_accuracy": {k: v["test_accuracy"] for k, v in runs.items()},
        "study_wall_seconds": plan.get("wall_seconds"),
        # the command's start: its preparation step by step, and when it was over
        "prepare_seconds": plan.get("prepare_seconds"),
        "prepared_after_seconds": plan["prepared_at"] - started if plan.get("prepared_at") else None,
        "runs": runs,
    }


def trainer_side(a: argparse.Namespace, seeds: list[int], methods: list[str], work: Path) -> dict:
    """The Trainer recipe's runs, seed by seed and method by method, and their total seconds (tokenizing
    once included)."""
    seed_preset = config.load_preset("seed")
    raw = {
        **seed_preset,
        "model": a.model,
        "train": {**seed_preset["train"], "max_length": a.max_length},
        "data": {
            **seed_preset["data"],
            "name": None,
            "path": a.data,
            "train_size": a.train_size,
            "test_size": a.test_size,
        },
    }
    study = Study(config.validate(raw), work / "trainer")
    study.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    study.prepare()
    tok = data_mod.Tokenized.load(study.tok_file)
    prep = time.perf_counter() - t0
    per = {}
    for seed in seeds:
        for m in methods:
            spec = speed.spec_for(study, m, study.model_path, None, "peftbench")  # the seed protocol's epochs
            r = speed.run_trainer(spec, tok, study.pad_token_id or 0, a.max_length, evaluate=True, seed=seed)
            per[m if len(seeds) == 1 else f"{m}/s{seed}"] = r
            print(
                json.dumps({"trainer": m, "seed": seed, **{k: round(v, 4) for k, v in r.items()}}), flush=True
            )
    return {
        "prepare_seconds": prep,
        "per_method": per,
        "total_seconds": prep + sum(r["total_seconds"] for r in per.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", type=int, default=0)
    ap.add_argument("--no-sequential", action="store_true", help="only the --parallel variant of peftbench")
    ap.add_argument("--extra", default="", help="more `peftbench run` arguments, e.g. '--compile cudagraphs'")
    ap.add_argument("--keep", default=None, help="keep peftbench's study folders here")
    ap.add_argument("--methods", default="full,lora,qlora,ia3")
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--train-size", type=int, default=3000, help="smaller for a smoke test")
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--seeds", default="42", help="training seeds, e.g. 1,2,3: every run once per seed, both sides"
    )
    ap.add_argument("--cli-timeout", type=float, default=None, help="seconds each peftbench command may take")
    ap.add_argument(
        "--imports", action="store_true", help="time both sides' imports in fresh processes first"
    )
    ap.add_argument("--mps", action="store_true", help="with --parallel: once more, with its --mps")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    os.environ.setdefault("PEFTBENCH_PROGRESS", "0")
    methods = a.methods.split(",")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="end-to-end-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: dict = {"argv": sys.argv[1:], "torch": speed.torch.__version__}
    if os.environ.get("PYTHONPYCACHEPREFIX"):
        rows["bytecode"] = f"cached in {os.environ['PYTHONPYCACHEPREFIX']} (`with_bytecode_cached`)"

    def save() -> None:  # after every part: a run cut off by a time limit keeps what it measured
        # --no-sequential: the parallel one
        side = "peftbench" if "peftbench" in rows else "peftbench_parallel"
        if len(seeds) > 1 and "trainer" in rows and side in rows:
            rows["accuracy_check"] = accuracy_check(
                rows["trainer"]["per_method"], rows[side]["test_accuracy"], side
            )
        rows["summary"] = summary(rows)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))

    if a.imports:
        rows["imports"] = {side: import_seconds(code) for side, code in IMPORTS.items()}
        print(json.dumps({"imports": rows["imports"]}), flush=True)
    if not a.skip_trainer:
        # its own process, ended before the peftbench commands start: they then find the GPU as a user
        # would, with no other process's CUDA context and cached memory on it
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows["trainer"] = pool.submit(trainer_side, a, seeds, methods, work).result()
        save()
    sizes = [
        "--train-size",
        str(a.train_size),
        "--test-size",
        str(a.test_size),
        "--max-length",
        str(a.max_length),
    ]
    sizes += ["--seeds", ",".join(map(str, seeds)) + ",", *a.extra.split()]  # a list, also for one seed
    if not a.no_sequential:
        rows["peftbench"] = peftbench_cli(
            a.model, a.data, work / "pb", ["--methods", a.methods, *sizes], a.cli_timeout
        )
        print(json.dumps({"peftbench": rows["peftbench"]["total_seconds"]}), flush=True)
        save()
    parallel = ["--methods", a.methods, *sizes, "--parallel", str(a.parallel), "--concurrent-finals"]
    for side, folder, wanted, mps in (
        ("peftbench_parallel", "pbp", a.parallel, []),
        ("peftbench_parallel_mps", "pbp-mps", a.parallel and a.mps, ["--mps"]),
    ):
        if wanted:
            rows[side] = peftbench_cli(a.model, a.data, work / folder, parallel + mps, a.cli_timeout)
            print(json.dumps({side: rows[side]["total_seconds"]}), flush=True)
            save()
    save()
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "summary": rows["summary"],
                **(
                    {
                        "accuracy_check": {
                            m: {"difference_points": c["difference_points"]}
                            for m, c in rows.get("accuracy_check", {}).items()
                        }
                    }
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
