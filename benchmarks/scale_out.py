"""Scale out: a study over 1 GPU vs 2 GPUs with the Ray executor, and one data-parallel run.

    python benchmarks/scale_out.py --model PATH --data DIR --out benchmarks/results/NAME.json \
        [--study studies/scale16.yaml] [--gpu-sets 0/0,1] [--ddp-models roberta,minilm] [--ddp-epochs 2]

(a) `peftbench run STUDY --executor ray` once per GPU set (CUDA_VISIBLE_DEVICES; Ray starts a local
instance that sees those GPUs and gives every run one): the wall clock of each whole command, and whether
the result files agree (config hashes, accuracies, test predictions) between the sets. (b) `peftbench run
--preset seed --methods full --epochs N --gpus-per-run 1`, then 2 (torchrun, the batch of 16 split 8 + 8),
on each model of --ddp-models: training samples/s and peak memory per GPU. "roberta" is a roberta-base-
shaped model with random weights (RobertaConfig with roberta-base's values, no download) and the MiniLM
tokenizer, so its time and memory are roberta-base's and its accuracy means nothing. Every command's own
study folder is kept under --work. On a CPU machine the same commands run as a smoke test (Ray CPU slots,
gloo processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import end_to_end  # noqa: E402
import speed  # noqa: E402

COMPARED = ("test_accuracy", "validation_accuracy", "trainable_params")


def cli(args: list[str], out: Path, gpus: str | None) -> dict:
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    secs, proc, cmd = end_to_end.run_cli(args, out, env=env)
    results = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/result.json"))]
    return {
        "command": " ".join(["peftbench", *cmd[3:]]),
        "CUDA_VISIBLE_DEVICES": gpus,
        "wall_seconds": secs,
        "exit_status": proc.returncode,
        "stderr_tail": proc.stderr[-800:] if proc.returncode else "",
        "runs": len(results),
        "succeeded": sum(r["status"] == "success" for r in results),
        "workers": sorted({(r.get("environment") or {}).get("worker", "?") for r in results}),
        "devices_seen_by_runs": sorted(
            {str((r.get("environment") or {}).get("cuda_visible_devices")) for r in results}
        ),
        # per run: its worker's whole life, and the part its phases account for (the rest: imports, setup)
        "run_seconds_mean": mean(
            [r["finished_at"] - r["started_at"] for r in results if r.get("finished_at")]
        ),
        "run_phase_seconds_mean": mean(
            [sum((r.get("metrics") or {}).get("phase_seconds", {}).values()) for r in results]
        ),
    }, results


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def agreement(a: list[dict], b: list[dict]) -> dict:
    """How far two executions of one study agree, run by run (the same runs, the same configs)."""
    by_id = {r["run_id"]: r for r in b}
    same_pred = same_metrics = 0
    worst = 0.0
    for r in a:
        o = by_id.get(r["run_id"])
        if (
            not o
            or r["config_hash"] != o["config_hash"]
            or r["status"] != "success"
            or o["status"] != "success"
        ):
            continue
        same_pred += r.get("test_predictions") == o.get("test_predictions")
        same_metrics += all(r["metrics"].get(k) == o["metrics"].get(k) for k in COMPARED)
        worst = max(worst, abs(r["metrics"]["test_accuracy"] - o["metrics"]["test_accuracy"]))
    return {
        "runs_compared": len([r for r in a if r["run_id"] in by_id]),
        "identical_test_predictions": same_pred,
        "identical_metrics": same_metrics,
        "max_test_accuracy_difference": worst,
    }


def ddp_row(results: list[dict]) -> dict:
    (r,) = results
    m = r.get("metrics") or {}
    return {
        "status": r["status"],
        "error": r.get("error"),
        "world_size": m.get("world_size"),
        "train_seconds": m.get("train_seconds"),
        "train_samples_per_second": m.get("train_samples_per_second"),
        "mfu": m.get("mfu"),
        "steps": m.get("steps"),
        "test_accuracy": m.get("test_accuracy"),
        "peak_memory_allocated_mb": m.get("peak_memory_allocated_mb"),
        "per_process_peak_mb": [p.get("peak_memory_allocated_mb") for p in m.get("per_process") or []],
        "history_train_loss": [h.get("train_loss") for h in r.get("history") or []],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", required=True, help="the MiniLM folder (also the roberta-shaped model's tokenizer)"
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="study folders go here (default: a temporary folder)")
    ap.add_argument("--study", default=str(Path(__file__).resolve().parents[1] / "studies" / "scale16.yaml"))
    ap.add_argument("--gpu-sets", default="0/0,1", help="CUDA_VISIBLE_DEVICES values, separated by '/'")
    ap.add_argument("--ddp-models", default="roberta", help="comma list of minilm, roberta; empty: none")
    ap.add_argument("--ddp-epochs", type=int, default=2)
    ap.add_argument("--sizes", default="", help="extra size arguments for every command (a CPU smoke test)")
    a = ap.parse_args()
    os.environ.setdefault("PEFTBENCH_PROGRESS", "0")
    work = Path(a.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "argv": sys.argv[1:],
        "torch": speed.torch.__version__,
        "gpus": speed.torch.cuda.device_count(),
        "scale": [],
        "ddp": {},
    }

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))

    sizes = a.sizes.split()
    first = None
    for gpus in [g for g in a.gpu_sets.split("/") if g]:
        name = "scale-" + gpus.replace(",", "_")
        row, results = cli(
            [a.study, "--executor", "ray", "--model", a.model, "--data", a.data, *sizes],
            work / name,
            gpus if speed.torch.cuda.is_available() else None,
        )
        if first is None:
            first = (row, results)
        else:
            row["speedup_vs_first"] = first[0]["wall_seconds"] / row["wall_seconds"]
            row["agreement_with_first"] = agreement(first[1], results)
        out["scale"].append(row)
        print(
            json.dumps(
                {k: row[k] for k in ("CUDA_VISIBLE_DEVICES", "wall_seconds", "succeeded", "exit_status")}
            ),
            flush=True,
        )
        save()
    for model in [m for m in a.ddp_models.split(",") if m]:
        path = a.model
        if model == "roberta":
            path = str(work / "roberta-shaped")
            if not Path(path, "config.json").exists():
                speed.roberta_shaped(Path(path), tokenizer_from=Path(a.model))
        for n in (1, 2):
            gpus = ",".join(str(i) for i in range(n)) if speed.torch.cuda.is_available() else None
            row, results = cli(
                [
                    "--preset",
                    "seed",
                    "--methods",
                    "full",
                    "--epochs",
                    str(a.ddp_epochs),
                    "--gpus-per-run",
                    str(n),
                    "--model",
                    path,
                    "--data",
                    a.data,
                    "--no-report",
                    *sizes,
                ],
                work / f"ddp-{model}-{n}",
                gpus,
            )
            row.update(ddp_row(results) if results else {})
            out["ddp"].setdefault(model, []).append(row)
            print(
                json.dumps(
                    {
                        "ddp": model,
                        "gpus": n,
                        "samples_per_s": row.get("train_samples_per_second"),
                        "exit_status": row["exit_status"],
                    }
                ),
                flush=True,
            )
            save()
        one, two = out["ddp"][model]
        if one.get("train_samples_per_second") and two.get("train_samples_per_second"):
            two["throughput_vs_1_gpu"] = two["train_samples_per_second"] / one["train_samples_per_second"]
            save()
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
