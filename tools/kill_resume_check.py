"""Kill a real study with SIGKILL at chosen moments, rerun the same command, and check what survived.

    python tools/kill_resume_check.py [--data ../shared/data/imdb] [--out /tmp/killcheck]

The study: MiniLM, 3 methods x 3 epochs on a small IMDb subset, each run in its own process. Kills
(of the whole process group, parent and worker): (1) mid-run, after the first run's epoch-1 checkpoint;
(2) as the second run starts; (3) mid-run in the third run, after its epoch-2 checkpoint. After every
kill it checks: every finished result.json parses and is unchanged by the restart, no temporary file
is left, and the final study has each run exactly once, with `resumed_from_epoch` where a run resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STUDY = """
name: killcheck
model: minilm
data: {{path: {data}, train_size: 160, validation_size: 40, test_size: 100}}
methods: [full, lora, ia3]
train: {{epochs: 3, max_length: 64}}
report: false
checkpoint_every_seconds: 0  # a checkpoint after every epoch, for the kills to land between them
"""


def results(out: Path) -> dict[str, dict]:
    found = {}
    for p in sorted((out / "runs").glob("*/result.json")) if (out / "runs").exists() else []:
        found[p.parent.name] = json.loads(p.read_text())  # raises if half-written
    return found


def epoch_of_checkpoint(run_dir: Path) -> int | None:
    """Epochs done according to the run's checkpoint (None if it has none or it is being replaced)."""
    ck = run_dir / "checkpoint.pt"
    if not ck.exists() or (run_dir / "result.json").exists():
        return None
    try:
        import torch

        return torch.load(ck, weights_only=True, map_location="cpu")["epoch"] + 1
    except Exception:
        return None


def wait_for(pred, proc, timeout=600) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("PEFTBENCH_DATA", "../shared/data/imdb"))
    ap.add_argument("--out", default="/tmp/killcheck")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    study = out.parent / f"{out.name}.yaml"
    study.write_text(STUDY.format(data=Path(a.data).resolve()))
    cmd = [sys.executable, "-m", "peftbench", "run", str(study), "--out", str(out)]
    env = dict(os.environ, PEFTBENCH_PROGRESS="0")
    runs = lambda: sorted(p.name for p in (out / "runs").glob("*")) if (out / "runs").exists() else []  # noqa: E731
    points = [
        (
            "mid-run 1, after its epoch-1 checkpoint",
            lambda: any((out / "runs" / r / "checkpoint.pt").exists() for r in runs()),
        ),
        ("as run 2 starts", lambda: len(results(out)) >= 1 and len(runs()) >= 2),
        (
            "mid-run 3, after its epoch-2 checkpoint",
            lambda: (
                len(results(out)) >= 2 and any(epoch_of_checkpoint(out / "runs" / r) == 2 for r in runs())
            ),
        ),
    ]
    log = []
    for i, (where, pred) in enumerate(points, 1):
        before = results(out)
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        hit = wait_for(pred, proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the study finished before the kill point came
            pass
        proc.wait()
        after = results(out)
        kept = [r for r in before if before[r]["started_at"] == after[r]["started_at"]]
        tmp = [str(p) for p in out.rglob("*.tmp")]
        log.append(
            {
                "kill": i,
                "where": where,
                "reached": hit,
                "results_before": len(before),
                "results_kept_unchanged": len(kept),
                "results_after": sorted(after),
                "checkpoints": sorted(p.parent.name for p in out.rglob("checkpoint.pt")),
                "tmp_files": tmp,
            }
        )
        assert len(kept) == len(before), "a finished run was redone or changed"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    final = results(out)
    log.append(
        {
            "final_exit": proc.returncode,
            "runs": {
                k: {
                    "status": v["status"],
                    "resumed_from_epoch": v["metrics"].get("resumed_from_epoch"),
                    "epochs": [h["epoch"] for h in v["history"]],
                }
                for k, v in final.items()
            },
        }
    )
    assert proc.returncode == 0 and len(final) == 3 and all(v["status"] == "success" for v in final.values())
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
