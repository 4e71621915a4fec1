"""The result store: one `result.json` per run under STUDY/runs/<run_id>/, written atomically.

A study folder is locked while a study writes to it, a corrupt result file is moved aside (never
silently trusted or deleted), and a rerun skips every run whose result says `success` for the same
config hash; a run made under another config hash moves to STUDY/archive-TIME/runs/ before it runs again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import UserError

SCHEMA = 1
# Run statuses whose result holds a validation accuracy (paused: stopped at a halving search's rung)
VALIDATED = ("success", "paused")


def _clean(obj):
    """JSON-safe copy: NaN/inf become null (strict JSON), numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, AttributeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: Path, obj) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(obj), f, indent=1, sort_keys=False, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_result(path: Path) -> dict | None:
    """The result at `path`, or None if missing; a corrupt file is moved aside with a warning."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(result, dict) or "status" not in result:
            raise ValueError("not a result")
        return result
    except (ValueError, UnicodeDecodeError):
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        print(
            f"peftbench: warning: {path} was corrupt; moved to {aside.name}, the run will be redone",
            file=sys.stderr,
        )
        return None


def read_json(path: Path) -> dict | None:
    """A JSON object written by `atomic_write_json`, or None if it is missing or unreadable."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def results(study_dir: Path, run_ids: list[str] | None = None) -> list[dict]:
    """Every readable result of a study (only `run_ids` if given), in a stable order."""
    runs = Path(study_dir) / "runs"
    if not runs.is_dir():
        return []
    dirs = (
        [runs / r for r in run_ids]
        if run_ids is not None
        else sorted(p for p in runs.iterdir() if p.is_dir())
    )
    out = []
    for d in dirs:
        r = read_result(d / "result.json")
        if r is not None:
            out.append(r)
    return out


class StudyLock:
    """An exclusive lock on a study folder, so two studies never write to the same one at once. Entering
    creates the folder (refused in one line where it cannot be written); a folder it created that holds
    nothing but the lock and empty cache folders when the study exits (a model that would not load) is
    removed again."""

    def __init__(self, study_dir: Path):
        self.path = Path(study_dir) / ".peftbench.lock"
        self.fd = None
        self.created: list[Path] = []  # the folders entering made, innermost first

    def __enter__(self):
        import fcntl

        folder = self.path.parent.absolute()
        self.created = [p for p in [folder, *folder.parents] if not p.exists()]
        check_writable(self.path.parent)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise UserError(
                f"another peftbench (pid {other}) is writing to {self.path.parent}; wait for it to "
                f"finish or choose another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        import fcntl

        if self.created and self._holds_nothing_else():
            shutil.rmtree(self.path.parent / ".cache", ignore_errors=True)
            self.path.unlink()  # still locked: a peftbench waiting on it is refused, not left writing
            for folder in self.created:
                with contextlib.suppress(OSError):  # not empty: another study writes there now
                    folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

    def _holds_nothing_else(self) -> bool:
        """The folder holds the lock, and at most a .cache of folders without a file (the compiler caches'
        folders, which importing torch's compiler makes)."""
        folder = self.path.parent
        if {p.name for p in folder.iterdir()} - {".cache"} != {self.path.name}:
            return False
        return not any(files for _, _, files in os.walk(folder / ".cache"))


def check_writable(study_dir: Path) -> None:
    study_dir = Path(study_dir)
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        probe = study_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"output folder {study_dir} is not writable ({e.strerror}); choose another with --out"
        ) from None


def load_plan(study_dir: Path) -> dict | None:
    """The study's plan (study.json), or None if it is missing, unreadable or not of a plan's shape."""
    plan = read_json(Path(study_dir) / "study.json")
    ok = (
        plan is not None
        and all(
            isinstance(plan.get(k), list) and all(isinstance(r, str) for r in plan[k])
            for k in ("final_runs", "trial_runs")
        )
        and isinstance(plan.get("study"), dict)
    )
    return plan if ok else None


# What a peftbench study folder may hold; anything else means the folder is someone else's.
STUDY_ENTRIES = {
    "study.json",
    "runs",
    "report",
    "summary.json",
    "plan.json",
    "mlruns",
    ".cache",
    ".peftbench.lock",
}
ARCHIVE_PREFIX = "archive-"


def study_identity(cfg: dict) -> str:
    """What makes two study files the same study: its name, model and data. Methods, training settings and
    seeds may change between reruns (finished runs with the same config are reused)."""
    import hashlib

    key = json.dumps([cfg.get("name"), cfg.get("model"), cfg.get("data")], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def folder_owner(study_dir: Path) -> str | None:
    """Whose folder this is: None (missing, empty, or runs without a study.json: free), the identity of the
    study in it, or "other" for a folder holding what peftbench does not write, or a damaged study.json."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        return None
    entries = {p.name for p in study_dir.iterdir() if not p.name.startswith(ARCHIVE_PREFIX)}
    entries -= {".peftbench.lock", ".cache"}
    if not entries:
        return None
    if not entries <= STUDY_ENTRIES:
        return "other"
    if not (study_dir / "study.json").exists():
        return None
    plan = load_plan(study_dir)
    return "other" if plan is None else plan.get("identity") or study_identity(plan.get("study") or {})


def _archive_folder(study_dir: Path) -> Path:
    """STUDY/archive-TIME/: where what a study replaces is kept (never read as the study's own)."""
    return Path(study_dir) / f"{ARCHIVE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"


def archive(study_dir: Path) -> Path:
    """Move a folder's previous study (or other contents) into STUDY/archive-TIME/ (`--force`)."""
    dest = _archive_folder(study_dir)
    dest.mkdir()
    for p in Path(study_dir).iterdir():
        if p.name != ".peftbench.lock" and not p.name.startswith(ARCHIVE_PREFIX):
            os.replace(p, dest / p.name)
    return dest


def archive_runs(study_dir: Path, run_dirs: list[Path]) -> Path:
    """Move runs whose results a rerun replaces (made under other settings) into STUDY/archive-TIME/runs/:
    what they measured is kept, and they start again in an empty folder."""
    dest = _archive_folder(study_dir)
    (dest / "runs").mkdir(parents=True, exist_ok=True)
    for d in run_dirs:
        os.replace(d, dest / "runs" / d.name)
    return dest
