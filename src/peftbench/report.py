"""Report and recommend from a study folder: tables, plots, report.md, a self-contained report.html,
and advice computed from the measured numbers (nothing here is written by hand per study).
"""

from __future__ import annotations

import base64
import html
import json
import re
import sys
from pathlib import Path

import numpy as np

from . import metrics, stats, store
from .artefacts import reload_warning
from .data import data_notes
from .errors import UserError
from .memory import fits_on
from .metrics import TASK_METRICS, bounds, is_fraction, oriented, ranking


# ----------------------------------------------------------------------------------------- loading
def load_study(study_dir: Path, tie_margin: float | None = None) -> dict:
    """Final and trial results of a study folder, its plan, and the summary rows; `tie_margin` in place of
    the study's own (`report` and `recommend --tie-margin`)."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"{study_dir} is not a study folder; give the --out folder of `peftbench run`")
    plan = store.load_plan(study_dir)
    if plan is None and (study_dir / "study.json").exists():
        raise UserError(
            f"{study_dir / 'study.json'} is damaged; rerun the study (`peftbench run ... --out "
            f"{study_dir}`) to rebuild it"
        )
    missing: list[str] = []
    if plan:
        finals = store.results(study_dir, plan["final_runs"])
        trials = store.results(study_dir, plan["trial_runs"])
        have = {r["run_id"] for r in finals + trials}
        missing = [r for r in plan["trial_runs"] + plan["final_runs"] if r not in have]
    else:
        every = store.results(study_dir)
        finals = [r for r in every if r.get("role") == "final"]
        trials = [r for r in every if r.get("role") == "trial"]
    if not finals and not trials:
        raise UserError(f"{study_dir} holds no run results yet; run a study into it first")
    labels = _test_labels(study_dir, finals, plan)
    cfg = (plan or {}).get("study") or (finals or trials)[0].get("config") or {}
    task, metric = cfg.get("task", "classification"), cfg.get("metric") or "accuracy"
    names = ((plan or {}).get("data") or {}).get("label_names")
    rows = stats.summarize(finals, labels, task, metric, len(names) if names else None)
    device = (plan or {}).get("device") or (finals or trials)[0]["config"].get("device", "cpu")
    name = (plan or {}).get("study", {}).get("name") or (finals or trials)[0].get("study", "study")
    shared = most_at_once(finals)
    loads = [(r.get("load") or {}) for r in finals if r.get("status") == "success"]
    loaded = max(
        [ld["start"] / ld["cpus"] for ld in loads if ld.get("start") is not None and ld.get("cpus")] or [0]
    )
    return {
        "dir": study_dir,
        "name": name,
        "test_labels": labels,
        "plan": plan,
        "finals": finals,
        "trials": trials,
        "rows": rows,
        "task": task,
        "metric": metric,
        "tie_margin": tie_margin or cfg.get("tie_margin") or stats.TIE_MARGIN,
        "tie_margin_from": "--tie-margin" if tie_margin else "the study's tie_margin",
        "gpu": str(device).startswith("cuda"),
        "concurrent_runs": shared,
        "missing": missing,
        "loaded": loaded if loaded > 1.0 else None,
    }


def most_at_once(runs: list[dict]) -> int:
    """The most runs that went at a time (sharing the device, where there was one) among `runs`."""
    return max([(r.get("config") or {}).get("concurrent_runs") or 1 for r in runs] or [1])


def _test_labels(study_dir: Path, finals: list[dict], plan: dict | None = None) -> np.ndarray | None:
    ok = [r for r in finals if r["status"] == "success"]
    if not ok:
        return None
    if plan and plan.get("data", {}).get("test_labels") is not None:
        return np.asarray(plan["data"]["test_labels"])
    tok = ok[0]["config"].get("tokens_file")
    if tok and Path(tok).exists():
        return np.load(tok)["test_labels"]
    tf = ok[0]["config"].get("texts_file")
    if tf and Path(tf).exists():
        return np.asarray(json.loads(Path(tf).read_text())["labels"]["test"])
    cached = sorted((Path(study_dir) / ".cache").glob("tokens-*.npz"))
    return np.load(cached[0])["test_labels"] if cached else None


# GPU memory as it decides an out-of-memory error: the device's figure (allocator reserve + CUDA context),
# else the reserve, else (results written before these were recorded) the allocated peak.
GPU_MEMORY_KEYS = ("peak_device_memory_mb", "peak_memory_reserved_mb", "peak_memory_allocated_mb")
GPU_MEMORY_LABEL = "peak GPU MB (device: reserved + context)"


def memory_of(row: dict, gpu: bool) -> float | None:
    if not gpu:
        return row["peak_host_rss_mb"]["mean"]
    return next((row[k]["mean"] for k in GPU_MEMORY_KEYS if k in row and row[k]["mean"] is not None), None)


# ----------------------------------------------------------------------------------------- formatting
def _fmt_acc(m: dict, n_test: int | None = None) -> str:
    """mean ± std [95% CI] over seeds; one seed: the binomial (Wilson) interval of a share of test items
    (`n_test` given only for accuracy and exact match)."""
    if m["mean"] is None:
        return "-"
    if m["ci_low"] is None:
        if not n_test:
            return f"{m['mean']:.4f}"
        low, high = stats.wilson(m["mean"], n_test)
        return f"{m['mean']:.4f} [{low:.3f}, {high:.3f}]"
    return f"{m['mean']:.4f} ± {m['std']:.4f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def _fmt_num(v, digits=1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _fmt_params(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v / 1e6:.2f}M" if v >= 1e6 else (f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}")


NAMES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "mcc": "MCC (two classes)",
    "f1_positive": "F1 (positive class)",
    "pearson": "Pearson",
    "spearman": "Spearman",
    "mse": "MSE",
    "micro_f1": "micro-F1",
    "exact_match": "exact match",
}
SHARES = {"accuracy", "exact_match"}  # shares of test items: one seed gets a Wilson interval


def _others(study: dict) -> list[str]:
    """The task's metrics beside the primary one, shown as means."""
    return [m for m in TASK_METRICS[study["task"]] if m != study["metric"]]


def table_rows(study: dict) -> list[list[str]]:
    gpu = study["gpu"]
    n_test = ((study.get("plan") or {}).get("data") or {}).get("sizes", {}).get("test")
    n_test = n_test if study["metric"] in SHARES else None
    out = []
    for r in study["rows"]:
        mark = "best" if r.get("best") else ""
        if r.get("vs_best"):
            mark = f"p={r['vs_best']['p_value']:.3f}" + (" (n.s.)" if r.get("indistinct_from_best") else "")
        status = r["status"] if r["status"] == "success" else f"{r['status']}: {'; '.join(r['errors'])[:120]}"
        out.append(
            [r["label"], _fmt_acc(r["score"], n_test)]
            + [_fmt_num(r[f"test_{m}"]["mean"], 4) for m in _others(study)]
            + [
                _fmt_num(r["train_seconds"]["mean"]),
                _fmt_params(r["trainable_params"]["mean"]),
                _fmt_num(memory_of(r, gpu), 0),
            ]
            + ([fits_on(memory_of(r, gpu))] if gpu else [])
            + [
                _fmt_num(r["train_samples_per_second"]["mean"]),
                _fmt_num(r["adapter_size_mb"]["mean"], 2),
                f"{r['learning_rate']:.2e}" if r["learning_rate"] else "-",
                str(len(r["seeds"])),
                mark,
                status,
            ]
        )
    return out


def table_header(study: dict) -> list[str]:
    gpu = study["gpu"]
    one = "[95% Wilson CI]" if study["metric"] in SHARES else "no interval"
    return (
        ["method", f"{NAMES[study['metric']]} (seeds: mean ± std [95% CI]; one seed: {one})"]
        + [NAMES[m] for m in _others(study)]
        + ["train s", "trainable", GPU_MEMORY_LABEL if gpu else "peak host MB"]
        + (["fits on (card)"] if gpu else [])
        + ["samples/s", "saved MB", "lr", "seeds", "vs best", "status"]
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def print_summary(study_dir: Path) -> None:
    study = load_study(study_dir)
    print(f"\n{study['name']}: {len(study['finals'])} final runs ({'GPU' if study['gpu'] else 'CPU'})")
    header = table_header(study)
    keep = [
        i for i, h in enumerate(header) if i < 2 or h in ("train s", "trainable", header[-1]) or "MB" in h
    ]
    keep = [i for i in keep if header[i] != "saved MB"]
    print(markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in table_rows(study)]))
    for line in _distrusted(study) + [nothing_learned(study) or ""]:
        if line:
            print(f"peftbench: warning: {line}", file=sys.stderr)
    if study["missing"]:
        print(
            f"{len(study['missing'])} planned runs have no result: {', '.join(study['missing'][:5])}"
            f"{' ...' if len(study['missing']) > 5 else ''}; rerun the study to finish them"
        )


# ----------------------------------------------------------------------------------------- recommendations
def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of points (name, cost, score; larger scores better) not dominated by a cheaper-or-equal,
    better-or-equal one."""
    front = []
    for name, cost, acc in points:
        dominated = any((c2 <= cost and a2 >= acc) and (c2 < cost or a2 > acc) for _, c2, a2 in points)
        if not dominated:
            front.append(name)
    return front


def _ok_rows(study: dict) -> list[dict]:
    return [r for r in study["rows"] if r["score"]["mean"] is not None]


TIME_NOISE = 1.2  # training times closer than 20% are not ranked
MEMORY_NOISE = 1.1  # memory budgets closer than 10% are not told apart


def _acc(r: dict) -> float:
    """The primary metric's mean over seeds."""
    return r["score"]["mean"]


def _better(r: dict) -> float:
    """The primary metric with larger meaning better (MSE negated)."""
    return oriented(r["metric"], _acc(r))


def _named(r: dict) -> str:
    """'accuracy 0.8912': the primary metric's name and mean."""
    return f"{NAMES[r['metric']]} {_acc(r):.4f}"


def recommendations(study: dict) -> list[dict]:
    """Advice computed from the measurements: each item has a title, the method and a one-sentence reason.
    Methods within the study's tie margin of the best, or not significantly different from it, count as near
    it. Time is ranked only beyond the noise (TIME_NOISE); memory only on a GPU, between budgets
    MEMORY_NOISE apart; a CPU study's host memory is not ranked at all."""
    tolerance = study["tie_margin"]
    rows = _ok_rows(study)
    if not rows:
        return []
    best = max(rows, key=_better)
    ci, name = best["score"], NAMES[best["metric"]]
    interval = f" (95% CI {ci['ci_low']:.3f}-{ci['ci_high']:.3f})" if ci["ci_low"] is not None else ""
    order = [r["label"] for r in sorted(rows, key=lambda r: -_better(r))]
    sharing = _places(study, order).count(1) - 1
    shared = (
        f" {sharing} other method(s) share first place: no settled verdict puts it ahead of them (Verdicts)."
        if sharing
        else ""
    )
    if nothing_learned(study):
        shared += " No run beat guessing, though (see the note above): this ranks noise."
    recs = [
        {
            "title": f"Best {name}",
            "method": best["label"],
            "reason": f"{best['label']} reached the best test {name}, {_acc(best):.4f}{interval}.{shared}",
        }
    ]
    near = [r for r in rows if _better(r) >= _better(best) - tolerance or r.get("indistinct_from_best")]
    pts = _amount(best["metric"], tolerance)
    recs.append(_fastest(best, near, pts, study.get("loaded")))
    recs.append(_fewest(best, near, pts))
    return recs + _memory_recs(rows, study["gpu"])


def _fastest(best: dict, near: list[dict], pts: str, loaded) -> dict:
    others = f"{len(near) - 1} other method(s)" if len(near) > 1 else "no other method"
    fastest = min(near, key=lambda r: r["train_seconds"]["mean"])
    t_best, t_fast = best["train_seconds"]["mean"], fastest["train_seconds"]["mean"]
    if fastest is best:
        why = (
            f"{best['label']} is also the fastest to train ({t_best:.1f} s) of the methods within {pts} of "
            f"it ({others})."
        )
    elif t_best < TIME_NOISE * t_fast:
        why = (
            f"the methods within {pts} of the best trained within {TIME_NOISE - 1:.0%} of each other's time "
            f"({t_fast:.1f}-{t_best:.1f} s): not a difference this measurement can rank."
        )
    else:
        why = (
            f"{fastest['label']} trained in {t_fast:.1f} s ({t_best / t_fast:.1f}x faster than "
            f"{best['label']}) "
            f"at {_named(fastest)} vs {_acc(best):.4f}."
        )
    if loaded:
        why += " Timings were taken on a loaded machine: see the note above."
    return {
        "title": f"Fastest within {pts} of the best (or not significantly different)",
        "method": fastest["label"],
        "reason": why,
    }


def _fewest(best: dict, near: list[dict], pts: str) -> dict:
    others = f"{len(near) - 1} other method(s)" if len(near) > 1 else "no other method"
    fewest = min(near, key=lambda r: r["trainable_params"]["mean"])
    n_few, n_best = fewest["trainable_params"]["mean"], best["trainable_params"]["mean"]
    if fewest is best:
        why = (
            f"{best['label']} also trains the fewest parameters ({_fmt_params(n_best)}) of the methods "
            f"within {pts} of it ({others})."
        )
    else:
        why = (
            f"{fewest['label']} trains {_fmt_params(n_few)} parameters ({n_few / n_best * 100:.2f}% of "
            f"{best['label']}'s) at {_named(fewest)}."
        )
    return {
        "title": f"Fewest trainable parameters within {pts} of the best",
        "method": fewest["label"],
        "reason": why,
    }


def _memory_recs(rows: list[dict], gpu: bool) -> list[dict]:
    """The best-scoring method within each method's peak (GPU studies), at the winner's own peak; a winner
    that peaked within MEMORY_NOISE of the line before it replaces that line."""
    if not gpu:
        return [
            {
                "title": "Memory",
                "method": "-",
                "reason": "not ranked: a CPU study measures the whole "
                "process's host memory, which differs between these methods by less than it varies; run the "
                "study on a GPU for memory figures that separate them.",
            }
        ]
    with_mem = sorted([r for r in rows if memory_of(r, gpu) is not None], key=lambda r: memory_of(r, gpu))
    recs, last, floor = [], None, 0.0  # floor: the lowest peak the last line stands for
    for budget_row in with_mem:
        win = max([r for r in with_mem if memory_of(r, gpu) <= memory_of(budget_row, gpu)], key=_better)
        if win is last:
            continue
        peak, merged = memory_of(win, gpu), ""
        if last is None or peak >= MEMORY_NOISE * floor:
            floor = peak
        else:  # peaks closer than memory varies: the better-scoring method stands for both
            recs.pop()
            merged = (
                f" {last['label']} peaked within {MEMORY_NOISE - 1:.0%} of that, at "
                f"{memory_of(last, gpu):,.0f} MB ({_named(last)}): closer than peaks are told apart."
            )
        recs.append(
            {
                "title": f"Best within {peak:,.0f} MB of peak GPU memory",
                "method": win["label"],
                "reason": f"{win['label']} is the best-scoring method that peaked at or below {peak:,.0f} MB "
                f"({_named(win)}).{merged}",
            }
        )
        last = win
    return recs


def parse_memory(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*(tb|gb|g|gib|mb|m|mib|kb)?\s*", text.lower())
    if not m:
        raise UserError(f"--max-memory: give a size like 8GB or 500MB, got {text!r}")
    unit = {
        "tb": 2**20,
        "gb": 1024,
        "g": 1024,
        "gib": 1024,
        "mb": 1,
        "m": 1,
        "mib": 1,
        "kb": 1 / 1024,
        None: 1,
    }
    return float(m.group(1)) * unit[m.group(2)]


def parse_duration(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|sec|m|min|h|hr)?\s*", text.lower())
    if not m:
        raise UserError(f"--max-train-time: give a duration like 90s, 10m or 1h, got {text!r}")
    return (
        float(m.group(1)) * {"s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}[m.group(2)]
    )


def recommend(
    study: dict, max_memory_mb: float | None, max_seconds: float | None, min_score: float | None
) -> dict:
    """Rank the methods meeting the constraints (`min_score`: the primary metric at least this, at most for
    MSE); if none does, name the binding constraint."""
    gpu = study["gpu"]
    rows = _ok_rows(study)
    checks = {
        "--max-memory": (
            max_memory_mb,
            lambda r: memory_of(r, gpu) is not None and memory_of(r, gpu) <= max_memory_mb,
        ),
        "--max-train-time": (max_seconds, lambda r: r["train_seconds"]["mean"] <= max_seconds),
        "--min-score": (min_score, lambda r: _better(r) >= oriented(r["metric"], min_score)),
    }
    active = {k: f for k, (v, f) in checks.items() if v is not None}
    ok = [r for r in rows if all(f(r) for f in active.values())]
    ranked = sorted(ok, key=lambda r: -_better(r))
    order = [r["label"] for r in ranked]
    out = {"ranked": [], "binding": [], "unsettled": _unsettled(study, order)}
    for r, place in zip(ranked, _places(study, order)):
        out["ranked"].append(
            {
                "method": r["label"],
                "place": place,
                "reason": (
                    f"{_named(r)}, {r['train_seconds']['mean']:.1f} s training, "
                    f"{_fmt_num(memory_of(r, gpu), 0)} MB peak {'GPU' if gpu else 'host'} memory, "
                    f"{_fmt_params(r['trainable_params']['mean'])} trainable"
                ),
            }
        )
    if not ranked:
        for name in active:
            others = [f for k, f in active.items() if k != name]
            freed = [r for r in rows if all(f(r) for f in others)]
            if freed:
                best = max(freed, key=_better)
                out["binding"].append(
                    f"{name} is binding: without it, {best['label']} qualifies "
                    f"({_named(best)}, "
                    f"{best['train_seconds']['mean']:.1f} s, "
                    f"{_fmt_num(memory_of(best, gpu), 0)} MB)"
                )
        if not out["binding"]:
            out["binding"].append("no single constraint is binding: relax several of them")
    return out


def recommend_cli(
    study_dir: Path,
    max_memory: str | None,
    max_time: str | None,
    min_score: float | None,
    tie_margin: float | None = None,
) -> int:
    study = load_study(study_dir, tie_margin)
    low, high = bounds(study["metric"])
    if min_score is not None and not low <= min_score <= high:
        raise UserError(
            f"--min-score: the study's metric is {study['metric']}, which lies in [{low:g}, {high:g}] "
            f"(0.9 for 90%); got {min_score}"
        )
    res = recommend(study, parse_memory(max_memory), parse_duration(max_time), min_score)
    if not res["ranked"]:
        print("No method satisfies all the constraints.")
        for line in res["binding"]:
            print(f"  {line}")
        return 1
    places = [r["place"] for r in res["ranked"]]
    for r in res["ranked"]:
        mark = "=" if places.count(r["place"]) > 1 else "."
        print(f"{r['place']}{mark} {r['method']}: {r['reason']}")
    for line in res["unsettled"] + [nothing_learned(study) or ""]:
        if line:
            print(f"  note: {line}")
    return 0


def _places(study: dict, order: list[str]) -> list[int]:
    """Each method's place in `order` (best first): 1 + the number of methods a settled verdict (better, and
    stable) puts ahead of it. Methods no such verdict separates share a place, so no place states an order
    the data do not support."""
    found = {(v["a"], v["b"]): v for v in verdicts(study)}
    ahead = [
        sum(
            1
            for above in order[:i]
            if (v := found.get((above, m))) is not None and v["verdict"] == "better" and v["stable"]
        )
        for i, m in enumerate(order)
    ]
    return [1 + n for n in ahead]


def _unsettled(study: dict, order: list[str]) -> list[str]:
    """Neighbours in a ranking whose order the data do not settle: tied, unsettled, or a verdict a rerun
    would likely not repeat."""
    found = {(v["a"], v["b"]): v for v in verdicts(study)}
    name = NAMES[study["metric"]]
    lines = []
    for a, b in zip(order, order[1:]):
        v = found.get((a, b)) or found.get((b, a))
        if v is None:
            continue
        within = _margin(v["metric"], v["margin"])
        if v["verdict"] == "tied":
            again = "" if v["stable"] else f"; a rerun shows it again with probability {v['stability']:.0%}"
            lines.append(f"{a} and {b} are tied on test {name} (within {within}){again}")
        elif v["verdict"] == "unsettled":
            lines.append(
                f"{a} over {b} is unsettled: these results show neither a difference in test {name} (p = "
                f"{v['p_value']:.3f}) nor a tie within {within}; more seeds or test items would settle it"
            )
        elif not v["stable"]:
            lines.append(
                f"{a} over {b} is unstable: a rerun with new seeds would give another verdict with "
                f"probability {1 - v['stability']:.0%}"
            )
    return lines


def compare_cli(dirs: list[Path], out: Path | None) -> int:
    parts = []
    header = [
        "study",
        "data",
        "device",
        "method",
        "metric",
        "test score (mean ± std [95% CI])",
        "train s",
        "trainable",
        GPU_MEMORY_LABEL,
        "peak host MB (CPU study)",
        "lr",
        "status",
    ]
    rows = []
    by_method: dict[str, dict[str, str]] = {}
    for d in dirs:
        s = load_study(d)
        plan = s["plan"] or {}
        data = (plan.get("study") or {}).get("data") or {}
        data_name = str(data.get("path") or data.get("name") or "?")
        device = str(plan.get("device") or "?")
        names = table_header(s)
        for r, cells in zip(s["rows"], table_rows(s)):
            cell = dict(zip(names, cells))
            mem = _fmt_num(memory_of(r, s["gpu"]), 0)  # GPU and host memory never share a column
            gpu_mb, host_mb = (mem, "-") if s["gpu"] else ("-", mem)
            acc, metric = cell[names[1]], NAMES[s["metric"]]
            rows.append(
                [f"{s['name']} ({d})", data_name, device, cell["method"], metric, acc, cell["train s"]]
                + [cell["trainable"], gpu_mb, host_mb, cell["lr"], cell["status"]]
            )
            by_method.setdefault(cell["method"], {})[f"{s['name']} ({d}): {metric}"] = acc
    parts.append(markdown_table(header, rows))
    if len(dirs) > 1:  # the same methods across studies (tasks, models, devices): one row per method
        cols = list(dict.fromkeys(c for m in by_method.values() for c in m))
        parts.append("\nEach study's primary metric by method:\n")
        parts.append(
            markdown_table(
                ["method", *cols], [[m, *(v.get(c, "-") for c in cols)] for m, v in by_method.items()]
            )
        )
    text = "\n".join(parts)
    print(text)
    if out:
        try:
            out.write_text(text + "\n")
        except OSError as e:
            raise UserError(
                f"--out {out}: cannot write there ({e.strerror or e}); give a path in an existing, "
                "writable folder"
            ) from None
    return 0


# ----------------------------------------------------------------------------------------- plots and files
def _plain(text: str) -> str:
    """Text as matplotlib shows it literally: a label like "$x^2$" is not TeX to parse (it crashed plots)."""
    return str(text).replace("$", r"\$")


def _plots(study: dict, out_dir: Path) -> dict[str, Path]:
    """Accuracy against memory, time and trainable parameters (with the Pareto front), and learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    gpu = study["gpu"]
    mem_label = "peak GPU memory, device figure (MB)" if gpu else "peak host memory (MB, CPU study)"
    metric = study["metric"]
    specs = [
        ("memory", lambda r: memory_of(r, gpu), mem_label, False),
        ("time", lambda r: r["train_seconds"]["mean"], "training time (s)", False),
        ("params", lambda r: r["trainable_params"]["mean"], "trainable parameters", True),
    ]
    files: dict[str, Path] = {}
    for name, xf, xlabel, logx in specs:
        pts = [(r["label"], xf(r), _acc(r), r["score"]) for r in _ok_rows(study) if xf(r) is not None]
        if pts:
            files[f"{metric}_vs_{name}"] = _scatter(
                pts,
                xlabel,
                logx,
                metric,
                f"{study['name']}: {NAMES[metric]} vs {xlabel.split(' (')[0]}",
                out_dir / f"{metric}_vs_{name}.png",
            )
    curves = [r for r in study["finals"] if r["status"] == "success" and r.get("history")]
    if curves:
        files["learning_curves"] = _learning_curves(curves, metric, out_dir / "learning_curves.png")
    return files


def _scatter(pts: list[tuple], xlabel: str, logx: bool, metric: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = set(pareto_front([(n, x, oriented(metric, y)) for n, x, y, _ in pts]))
    for i, (n, x, y, a) in enumerate(sorted(pts, key=lambda p: (p[2], p[1]))):
        err = None if a["ci_low"] is None else [[y - a["ci_low"]], [a["ci_high"] - y]]
        ax.errorbar(
            [x], [y], yerr=err, fmt="o", ms=8, capsize=3, color="tab:red" if n in front else "tab:blue"
        )
        # Neighbours in score get labels at staggered heights, so that crowded points stay readable.
        ax.annotate(
            _plain(n), (x, y), textcoords="offset points", xytext=(6, 4 + 9 * (i % 3) - 9), fontsize=8
        )
    fp = sorted([(x, y) for n, x, y, _ in pts if n in front])
    if len(fp) > 1:
        ax.step([p[0] for p in fp], [p[1] for p in fp], where="post", color="tab:red", alpha=0.5)
    ax.plot([], [], "o", color="tab:red", label="on the Pareto front (nothing better on both axes)")
    ax.plot([], [], "o", color="tab:blue", label="dominated")
    ax.legend(loc="best", fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=f"test {NAMES[metric]}")
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _learning_curves(curves: list[dict], metric: str, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = sorted({c["label"] for c in curves})
    seen = set()
    for r in sorted(curves, key=lambda r: (r["label"], r["seed"])):
        epochs = [x["epoch"] for x in r["history"]]
        style = {
            "color": f"C{labels.index(r['label']) % 10}",
            "alpha": 0.8,
            "label": _plain(r["label"]) if r["label"] not in seen else None,
        }
        seen.add(r["label"])
        a1.plot(epochs, [x[f"validation_{metric}"] for x in r["history"]], "o-", **style)
        if any(x.get("train_loss") is not None for x in r["history"]):
            a2.plot(epochs, [x["train_loss"] for x in r["history"]], "o-", **style)
    a1.set(
        xlabel="epoch", ylabel=f"validation {NAMES[metric]}", title=f"validation {NAMES[metric]} per epoch"
    )
    a2.set(xlabel="epoch", ylabel="mean train loss", title="train loss per epoch")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # a TF-IDF baseline alone has no training loss to draw
            a.legend(fontsize=8)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    # the layout is done: without this, tight_layout leaves a placeholder layout engine, for which savefig
    # first lays out the whole figure once more in a draw of its own (a fifth of a report's plotting time)
    fig.set_layout_engine(None)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _problems(study: dict) -> list[str]:
    failed = [
        f"{r['run_id']}: {r['status']} - {r.get('error')}"
        for r in study["finals"] + study["trials"]
        if r["status"] not in store.VALIDATED
    ]
    return (
        failed
        + _distrusted(study)
        + [
            f"{r}: planned, no result (interrupted, or its folder was removed): rerun the study"
            for r in study.get("missing", [])
        ]
    )


def _distrusted(study: dict) -> list[str]:
    """Successful final runs whose results are not to be trusted: a saved artefact that does not reproduce
    its predictions, or test predictions that tell nothing about the labels."""
    checks = (reload_warning, lambda r: _learned_nothing(study, r), _unstandardized)
    return [w for r in study["finals"] for w in (check(r) for check in checks) if w]


# Regression scores whose mean or standard deviation is beyond this, trained without standardization, are
# named: a head that starts near 0 and steps a learning rate's worth cannot reach them. Unstandardized, on
# all-MiniLM-L6-v2 and 1,500 STS-B pairs (2 epochs, CPU, 2026-12-05), test Pearson for full fine-tuning at
# lr 2e-5 and LoRA at 5e-4 was 0.41 and 0.48 on the 0-5 scores (mean 2.4, std 1.5), 0.19 and 0.47 on scores
# x4 (mean 9.5) and 0.21 and 0.20 on scores x20.
UNSTANDARDIZED_NOTE = 5.0


def _unstandardized(r: dict) -> str | None:
    """A regression run whose scores were not standardized (`train.py`, `Recipe._scale_score_head`, says why
    not) and are far from unit size; or were only scaled (a head without a bias) and have a mean far from 0
    in standard deviations."""
    scale = (r.get("metrics") or {}).get("score_scale") or {}
    state = scale.get("standardized", "on")
    if r["status"] != "success" or state == "on":
        return None
    mean, std = scale["mean"], scale["std"]
    size = abs(mean) / std if state.startswith("scale only") and std else max(abs(mean), std)
    if size <= UNSTANDARDIZED_NOTE:
        return None
    return (
        f"{r['run_id']}: its training scores (mean {mean:.3g}, standard deviation {std:.3g}) trained "
        f"unstandardized ({state}): a head that starts near 0 moves little at fine-tuning learning rates; "
        f"rescale the scores to about unit size, e.g. (score - {mean:.3g}) / {std:.3g}"
    )


# Below this many test items only large gains over guessing are significant (0.6 against 0.5 at p 0.003 on
# 200 items, p 0.10 on 48): a run not shown to beat guessing there is told to use a larger test split.
SMALL_TEST = 200


def _learned_nothing(study: dict, r: dict) -> str | None:
    """A run whose test predictions tell nothing about the labels (a constant answer, or accuracy or
    correlation no better than guessing) learned nothing the test can show: its score measures the test
    set, not the method."""
    preds = r.get("test_predictions")
    if r["status"] != "success" or not preds:
        return None
    fix = "it learned nothing the test can show"
    if study["task"] == "classification" and len(set(preds)) == 1:
        names = ((study.get("plan") or {}).get("data") or {}).get("label_names") or []
        name = names[preds[0]] if preds[0] < len(names) else preds[0]
        said = f"predicts class {name} for all {len(preds)} test items, as a constant answer would"
        return f"{r['run_id']}: {said}: {fix}; try a lower learning rate or more epochs"
    test = _guess_test(study, r)
    if test is None or test["p_value"] < stats.ALPHA:
        return None
    if test["p_below"] < REVERSED:
        return _reversed(r["run_id"], test, study["task"])
    if len(preds) < SMALL_TEST:
        fix += (
            f"; the test split is small ({len(preds)} items): a larger one (data.test_size) would show more"
        )
    else:
        fix += "; try more epochs, other learning rates or a larger model"
    if "pearson" in test:
        return (
            f"{r['run_id']}: its test predictions do not correlate with the scores (Pearson "
            f"{test['pearson']:.3f}, one-sided p = {test['p_value']:.2f}): {fix}"
        )
    return (
        f"{r['run_id']}: {_right(study['task'], test)} is no better than guessing (answers drawn at random "
        f"in the shares it gave them would score {test['guess']:.3f}; one-sided p = {test['p_value']:.2f}): "
        f"{fix}"
    )


def _right(task: str, test: dict) -> str:
    if task == "multi_label":
        return f"the share of its (text, label) answers that are right, {test['accuracy']:.3f},"
    return f"test accuracy {test['accuracy']:.3f}"


# Test predictions worse than guessing at this p-value: the model learned something, and the test split's
# labels seem to mean something else (swapped or shifted between the files).
REVERSED = 0.001


def _reversed(run_id: str, test: dict, task: str) -> str:
    if "pearson" in test:
        said = f"its test predictions correlate negatively with the scores (Pearson {test['pearson']:.3f})"
    else:
        said = (
            f"{_right(task, test)} is far below guessing ({test['guess']:.3f} for random answers in its own "
            "shares)"
        )
    return (
        f"{run_id}: {said}, one-sided p = {test['p_below']:.1e}: it learned the training labels, and the "
        "test labels seem to mean something else; check that the test file's labels are coded as the "
        "training file's (not swapped or shifted)"
    )


def _guess_test(study: dict, r: dict) -> dict | None:
    return stats.against_guessing(study["task"], r.get("test_predictions"), study.get("test_labels"))


def nothing_learned(study: dict) -> str | None:
    """Where no successful final run's test predictions beat guessing: the labels may not follow from the
    texts (a wrong label column, or texts and labels shuffled apart), or nothing trained at these settings."""
    ok = [r for r in study["finals"] if r["status"] == "success" and r.get("test_predictions")]
    if not ok or study.get("test_labels") is None or not all(_learned_nothing(study, r) for r in ok):
        return None
    said = f"no run's test predictions beat guessing ({len(ok)} of {len(ok)} final runs)"
    below = sum(1 for r in ok if (t := _guess_test(study, r)) and t["p_below"] < REVERSED)
    if below:
        return (
            f"{said}, and {below} fall far below it: the test labels seem coded otherwise than the training "
            "labels (swapped or shifted); check the test file's label column"
        )
    return (
        f"{said}: either nothing was learned at these settings, or the labels do not follow from the "
        "texts; check data.label_column and data.text_column, and that texts and labels were not shuffled "
        "apart"
    )


def _trials_table(study: dict) -> tuple[list[str], list[list[str]]]:
    metric = study["metric"]
    header = ["method", "learning rate", f"validation {NAMES[metric]}", "selected", "status"]
    chosen = (study["plan"] or {}).get("chosen_learning_rates", {})
    rows = []
    for r in sorted(study["trials"], key=lambda r: (r["label"], r["learning_rate"] or 0)):
        acc = r["metrics"].get(f"validation_{metric}") if r["status"] in store.VALIDATED else None
        status = r["status"]
        if status == "paused":
            status = f"stopped after {r['metrics'].get('epochs_done')} epoch(s)"
        rows.append(
            [
                r["label"],
                f"{r['learning_rate']:.2e}",
                _fmt_num(acc, 4),
                "yes" if chosen.get(r["label"]) == r["learning_rate"] else "",
                status,
            ]
        )
    return header, rows


def lr_choice(study: dict) -> list[dict]:
    """How clear each method's learning-rate choice was: the chosen rate's validation metric against the
    runner-up's, in the metric's units (points for shares and correlations) and, for accuracy, in
    validation items (one item is 100/n points)."""
    plan, metric = study["plan"] or {}, study["metric"]
    n_val = ((plan.get("data") or {}).get("sizes") or {}).get("validation")
    chosen = plan.get("chosen_learning_rates") or {}
    search = plan.get("lr_search") or {}
    out = []
    for label, lr in chosen.items():
        means = _trial_means(study["trials"], label, (search.get(label) or {}).get("rungs"), metric)
        others = {k: v for k, v in means.items() if k != lr}
        if lr not in means or not others:
            continue
        runner_up = ranking(metric, others)[0]
        gap = oriented(metric, means[lr] - others[runner_up])
        out.append(
            {
                "method": label,
                "learning_rate": lr,
                f"validation_{metric}": means[lr],
                "runner_up": runner_up,
                "gap": gap,
                "gap_points": 100 * gap if is_fraction(metric) else None,
                "gap_items": round(gap * n_val) if n_val and metric == "accuracy" else None,
                "validation_items": n_val,
            }
        )
    return out


def _trial_means(trials: list[dict], label: str, rungs: list[dict] | None, metric: str) -> dict[float, float]:
    """Each rate's mean validation metric over the trial seeds; after a halving search, at the last rung
    that compared more than one rate (the rates it chose between, at equal epochs)."""
    key = f"validation_{metric}"
    compared = [r for r in rungs or [] if len(r["rates"]) > 1]
    if compared:
        return {x["learning_rate"]: x[key] for x in compared[-1]["rates"]}
    runs: dict[float, list] = {}
    for r in trials:
        if r["label"] == label and r["status"] == "success":
            runs.setdefault(r["learning_rate"], []).append(r["metrics"][key])
    return {k: float(np.mean(v)) for k, v in runs.items()}


def search_cost(study: dict) -> list[tuple[str, str]]:
    """Per method, how its rate was searched and what that cost beside the full grid. The grid's estimate
    (a range: see runner._grid_estimate) is shown only from records that hold the CUDA graphs' start-up
    time; an older record scaled seconds by epochs, which overstates it."""
    lines = []
    for label, s in ((study["plan"] or {}).get("lr_search") or {}).items():
        grid, started = s.get("grid_run_seconds"), s.get("graph_start_seconds")
        start = f", {started:,.0f} s of it starting CUDA graphs" if started else ""
        if s["schedule"] == "halving":
            steps = " -> ".join(f"{len(r['rates'])} rates at {r['epochs']} epoch(s)" for r in s["rungs"])
            low, run = s.get("grid_run_seconds_low"), s["run_seconds"]
            ratio = (
                f"; {low / run:.1f}-{grid / run:.1f}x less than the full grid's estimated "
                f"{low:,.0f}-{grid:,.0f} s"
                if (low and run)  # written with the start-up time, as grid_run_seconds then is
                else ""
            )
            span = s.get("trial_epochs")  # not in records written before trials' schedules were shortened
            span = f", each trial's learning-rate schedule over {span} epoch(s)" if span else ""
            text = (
                f"successive halving ({steps}{span}); {s['epochs_run']} of the grid's {s['grid_epochs']} "
                f"trial epochs, {s['run_seconds']:,.0f} s of training and validation{start}{ratio}."
            )
        else:
            seconds = f"{s['run_seconds']:,.0f} s of training and validation{start}"
            text = f"full grid: {s['grid_epochs']} trial epochs, {seconds}."
        lines.append((label, text))
    wall = (study["plan"] or {}).get("lr_search_wall_seconds")
    if lines and wall:
        lines.append(
            (None, f"The search took {wall:,.0f} s from its first trial to its choice (all methods).")
        )
    at_once = most_at_once(study.get("trials") or [])
    if lines and at_once > 1:
        lines.append(
            (
                None,
                f"Trials went {at_once} at a time: where they shared a device, each one's seconds include "
                "the others' work, so the search's wall time is its cost.",
            )
        )
    return lines


def budget_table(study: dict) -> tuple[list[str], list[list[str]], float | None]:
    """The validation metric at equal epochs, and training seconds to first reach a common validation level.

    The common target is the worst of the methods' best validation scores: a level every method reached,
    so "faster" compares time to the same quality rather than time to different end points.
    """
    metric = study["metric"]
    key = f"validation_{metric}"
    by_label: dict[str, list[dict]] = {}
    for r in study["finals"]:
        if r["status"] == "success" and r.get("history") and r["history"][0].get("train_loss") is not None:
            by_label.setdefault(r["label"], []).append(r)
    if not by_label:
        return [], [], None
    epochs = max(len(r["history"]) for rs in by_label.values() for r in rs)
    best_val = {
        k: np.mean([max(oriented(metric, h[key]) for h in r["history"]) for r in rs])
        for k, rs in by_label.items()
    }
    target = oriented(metric, float(min(best_val.values())))
    short = "val acc" if metric == "accuracy" else f"val {NAMES[metric]}"
    header = (
        ["method"]
        + [f"{short} @ epoch {e}" for e in range(1, epochs + 1)]
        + [f"train s to {short} {target:.3f}"]
    )
    rows = []
    for label, rs in by_label.items():
        cells = [label]
        for e in range(epochs):
            vals = [r["history"][e][key] for r in rs if len(r["history"]) > e]
            cells.append(_fmt_num(float(np.mean(vals)), 4) if vals else "-")
        times = [stats.time_to_reach(r["history"], metric, target - oriented(metric, 1e-9)) for r in rs]
        reached = [t for t in times if t is not None]
        cells.append(
            f"{np.mean(reached):.1f}"
            + ("" if len(reached) == len(times) else f" ({len(reached)}/{len(times)} seeds)")
            if reached
            else "never"
        )
        rows.append(cells)
    return header, rows, target


def execution_table(study: dict) -> tuple[list[str], list[list[str]]]:
    """How each method's first successful final run trained: precision, frozen weights, micro-batch, the
    memory levers, and the forward path chosen for it, with the reason where a speed-up was off."""
    header = ["method", "precision", "frozen weights", "micro-batch", "checkpointing", "optimizer"]
    header += ["layer norms", "attention mask", "packed batches", "CUDA graphs"]
    rows, seen = [], set()
    for r in study["finals"]:
        m = r.get("metrics") or {}
        if r["status"] != "success" or r["label"] in seen or "precision" not in m:  # TF-IDF trains no net
            continue
        seen.add(r["label"])
        graphs = m.get("cuda_graphs")
        frozen = m.get("base_dtype")
        if m.get("layers_4bit"):  # the quantized layers' weights are not a float dtype
            frozen = f"4-bit in {m['layers_4bit']} layers, else {frozen}"
        cells = [m["precision"], frozen, m.get("micro_batch_size")]
        cells += ["on" if m.get("gradient_checkpointing") else "off", m.get("optimizer")]
        cells += [m.get("layer_norms"), m.get("attention_mask"), m.get("packing")]
        cells += [f"{graphs['graphs']} recorded" if isinstance(graphs, dict) else graphs]
        rows.append([r["label"]] + ["-" if c is None else str(c) for c in cells])
    return header, rows


# What writing a report imports, beyond this module: 1.2 of its 1.8 s for the starting study's four runs on a
# 2-core CPU. `peftbench run` imports them while its runs train (`import_dependencies`).
DEPENDENCIES = ("matplotlib.pyplot", "matplotlib.backends.backend_agg", "scipy.stats", "sklearn.metrics")


def import_dependencies() -> None:
    """Import what writing a report will (`DEPENDENCIES`), ahead of it (`metrics.import_dependencies`). A
    failure is left for the report to raise and explain."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # as `_plots` does, before pyplot chooses a backend
    except Exception:
        return
    metrics.import_dependencies(DEPENDENCIES)


def write_report(study_dir: Path, tie_margin: float | None = None) -> dict[str, Path]:
    """report.md, report.html (self-contained) and the plots, in STUDY/report/."""
    try:
        return _write_report(study_dir, tie_margin)
    except OSError as e:
        raise UserError(
            f"cannot write the report into {Path(study_dir) / 'report'} ({e.strerror or e}); make the "
            "folder writable, or copy the study folder somewhere writable"
        ) from None


def _intro(study: dict) -> str:
    """What the study was, in words: model, data, sizes, truncation, overlap, device and load."""
    plan = study["plan"] or {}
    data, cfg = plan.get("data") or {}, plan.get("study") or {}
    sizes = data.get("sizes") or {}
    where = (cfg.get("data") or {}).get("path") or (cfg.get("data") or {}).get("name") or "?"
    device = {"cpu": "the CPU"}.get(plan.get("device"), plan.get("device") or "?")
    text = (
        f"Study **{study['name']}** on {device}: model `{cfg.get('model')}` on `{where}`, with "
        f"{sizes.get('train', '?'):,} training, {sizes.get('validation', '?'):,} validation and "
        f"{sizes.get('test', '?'):,} test texts ({data.get('origin', '')}); {len(study['finals'])} final "
        f"runs and {len(study['trials'])} learning-rate trials. The task is {study['task']}; test scores "
        f"are on the test split, scored once per final run; learning rates and epochs were chosen on the "
        f"validation split by {NAMES[study['metric']]}."
    )
    cut = (data.get("truncated") or {}).get("train")
    if cut and sizes.get("train"):
        text += (
            f" {cut:,} of the {sizes['train']:,} training texts ({cut / sizes['train']:.0%}) were cut at "
            f"{(cfg.get('train') or {}).get('max_length')} tokens."
        )
    labels = data.get("test_labels")
    overlap = data.get("overlap") or {}
    names = data.get("label_names") or []
    notes = (
        *data_notes(
            study["task"], study["metric"], labels or [], names, overlap, sizes, data.get("label_words")
        ),
        data.get("tokenizer_note"),
        nothing_learned(study),
    )
    for said in filter(None, notes):
        text += f" **Note: {said}.**"
    if overlap.get("test_texts_also_in_train"):
        text += f" {overlap['test_texts_also_in_train']} test texts are also training texts."
    if study.get("loaded"):
        text += (
            f" **Timings were taken on a loaded machine**: when runs started, the 1-minute load average was "
            f"up to {study['loaded']:.1f} times the number of cores."
        )
    return text


def per_class_tables(study: dict) -> dict[str, tuple]:
    """Per method (its first seed), precision, recall, F1 and support per class, and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    names = ((study.get("plan") or {}).get("data") or {}).get("label_names")
    labels = _test_labels(study["dir"], study["finals"], study["plan"])
    out = {}
    if study["task"] != "classification":  # scores and label sets have no confusion matrix
        return out
    for r in sorted(study["finals"], key=lambda r: (r["label"], r["seed"])):
        if (
            r["label"] in out
            or r["status"] != "success"
            or r.get("test_predictions") is None
            or labels is None
        ):
            continue
        names = names or [str(i) for i in range(int(max(labels.max(), max(r["test_predictions"]))) + 1)]
        ids = list(range(len(names)))
        p, rc, f, n = precision_recall_fscore_support(
            labels, r["test_predictions"], labels=ids, zero_division=0
        )
        rows = [[names[i], f"{p[i]:.3f}", f"{rc[i]:.3f}", f"{f[i]:.3f}", str(n[i])] for i in ids]
        cm = confusion_matrix(labels, r["test_predictions"], labels=ids)
        out[f"{r['label']} (seed {r['seed']})"] = (
            ["class", "precision", "recall", "F1", "support"],
            rows,
            ["true \\ predicted"] + names,
            [[names[i]] + [str(v) for v in cm[i]] for i in ids],
        )
    return out


def _write_report(study_dir: Path, tie_margin: float | None = None) -> dict[str, Path]:
    """Write report.md, report.html (self-contained: plots embedded) and the plots as PNG files."""
    study = load_study(study_dir, tie_margin)
    out = Path(study_dir) / "report"
    out.mkdir(exist_ok=True)
    plots = _plots(study, out)
    recs = recommendations(study)
    problems = _problems(study)
    intro = _intro(study)
    if study.get("concurrent_runs", 1) > 1:
        mps = " (their kernels side by side, under NVIDIA MPS)" if (study["plan"] or {}).get("mps") else ""
        intro += (
            f" **Timings were measured under contention**: up to {study['concurrent_runs']} runs shared the "
            f"device{mps}, so times, throughput and memory headroom are comparable only roughly, within this "
            f"study; rerun without --parallel/--concurrent-finals for clean timings."
        )
    sections = _sections(study, recs, problems)
    (out / "report.md").write_text(_markdown(study["name"], intro, sections, plots))
    (out / "report.html").write_text(_html(study["name"], intro, sections, plots))
    summary = {
        "study": study["name"],
        "rows": stats.public(study["rows"]),
        "verdicts": verdicts(study),
        "learning_rate_choice": lr_choice(study),
        "learning_rate_search": (study["plan"] or {}).get("lr_search") or {},
        "recommendations": recs,
        "problems": problems,
    }
    store.atomic_write_json(Path(study_dir) / "summary.json", summary)
    return {"html": out / "report.html", "markdown": out / "report.md", **plots}


def verdicts(study: dict) -> list[dict]:
    """The pairwise verdicts of a loaded study, computed once and only where a report or recommend needs them
    (their bootstraps are the slowest part of a report; the printed summary does without)."""
    if "verdicts" not in study:
        study["verdicts"] = stats.verdicts(study["rows"], study["tie_margin"])
    return study["verdicts"]


def _amount(metric: str, margin: float) -> str:
    """A difference in a metric in words: 1 point, 0.5 points, or 0.05 for a metric not read in points."""
    if not is_fraction(metric):
        return f"{margin:g}"
    points = 100 * margin
    return f"{points:g} point" + ("" if points == 1 else "s")


def _margin(metric: str, margin: float) -> str:
    return "±" + _amount(metric, margin)


def verdict_table(study: dict) -> tuple[list[str], list[list[str]]]:
    points = is_fraction(study["metric"])
    header = ["method", "vs", "difference (points)" if points else "difference", "p", "verdict", "stability"]
    rows = []
    for v in verdicts(study):
        stab = (
            "-"
            if v["stability"] is None
            else f"{v['stability']:.2f}" + ("" if v["stable"] else " (unstable)")
        )
        diff = f"{v['diff_points']:+.2f}" if points else f"{v['diff']:+.4f}"
        rows.append([v["a"], v["b"], diff, f"{v['p_value']:.3f}", v["verdict"], stab])
    return header, rows


def _sections(study: dict, recs: list[dict], problems: list[str]) -> list[tuple[str, list]]:
    """The report after its intro, as (title, parts); a part is ("table", header, rows), ("list", [(bold,
    text)]) or ("text", line). Markdown and HTML render the same sections."""
    out = [
        ("Summary", [("table", table_header(study), table_rows(study))]),
        ("Recommendations", [("list", [(r["title"], r["reason"]) for r in recs])]),
    ]
    vh, vr = verdict_table(study)
    if vr:
        source = study.get("tie_margin_from", "the study's tie_margin")
        note = (
            f"Verdicts: tied when the difference's 90% interval lies within "
            f"{_margin(study['metric'], study['tie_margin'])} ({source}), better or "
            "worse when the paired test finds a difference (p < 0.05), unsettled when these results show "
            "neither. Stability: the probability that a rerun of the study with new seeds gives the same "
            "verdict, from the bootstrap spread of the difference (a difference at p = 0.05 reruns as one "
            f"about half the time); below {stats.STABLE} the verdict is unstable. One seed: not assessed."
        )
        out.append(
            (
                f"Verdicts (test {NAMES[study['metric']]}, every pair of methods)",
                [("table", vh, vr), ("text", note)],
            )
        )
    bh, br, _ = budget_table(study)
    if br:
        out.append(("Budget view (validation, mean over seeds)", [("table", bh, br)]))
    eh, er = execution_table(study)
    if er:
        out.append(("How each method ran (its first seed)", [("table", eh, er)]))
    if study["trials"]:
        clarity = [
            (
                c["method"],
                f"{c['learning_rate']:.2e} chosen at validation {NAMES[study['metric']]} "
                f"{c['validation_' + study['metric']]:.4f}, "
                + (f"{c['gap_points']:.2f} points" if c["gap_points"] is not None else f"{c['gap']:.4f}")
                + (
                    f" ({c['gap_items']} of {c['validation_items']} validation items)"
                    if c["gap_items"] is not None
                    else ""
                )
                + f" above the runner-up {c['runner_up']:.2e}",
            )
            for c in lr_choice(study)
        ]
        out.append(
            (
                "Learning-rate search (validation)",
                [("table", *_trials_table(study)), ("list", clarity), ("list", search_cost(study))],
            )
        )
    for label, (ph, pr, ch, cr) in per_class_tables(study).items():
        out.append(
            (
                f"Per class: {label}",
                [
                    ("table", ph, pr),
                    ("text", "Confusion (rows: true, columns: predicted)"),
                    ("table", ch, cr),
                ],
            )
        )
    if problems:
        out.append(
            ("Problems: failed runs, and results not to trust", [("list", [(None, p) for p in problems])])
        )
    return out


def _markdown(name: str, intro: str, sections: list, plots: dict[str, Path]) -> str:
    md = [f"# peftbench report: {name}", "", intro, ""]
    for title, parts in sections:
        md += [f"## {title}", ""]
        for kind, *rest in parts:
            if kind == "table":
                md += [markdown_table(*rest), ""]
            elif kind == "list":
                md += [f"- **{a}**: {b}" if a else f"- {b}" for a, b in rest[0]] + [""]
            else:
                md += [rest[0], ""]
    md += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()] + [""]
    return "\n".join(md)


def _html(name: str, intro: str, sections: list, plots: dict[str, Path]) -> str:
    e = html.escape
    body = [f"<h1>peftbench report: {e(name)}</h1>", f"<p>{e(intro.replace('**', '').replace('`', ''))}</p>"]
    for title, parts in sections:
        body.append(f"<h2>{e(title)}</h2>")
        for kind, *rest in parts:
            if kind == "table":
                head, rows = rest
                body.append(
                    "<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr></thead>"
                    "<tbody>"
                    + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                    + "</tbody></table>"
                )
            elif kind == "list":
                body.append(
                    "<ul>"
                    + "".join(
                        f"<li><b>{e(a)}</b>: {e(b)}</li>" if a else f"<li>{e(b)}</li>" for a, b in rest[0]
                    )
                    + "</ul>"
                )
            else:
                body.append(f"<p>{e(rest[0])}</p>")
    body += ["<h2>Plots</h2>"] + [
        f'<figure><img alt="{e(k)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{e(k.replace('_', ' '))}</figcaption></figure>"
        for k, p in plots.items()
    ]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
        "th{background:#f3f3f3}figure{display:inline-block;margin:8px}img{max-width:520px}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>peftbench: {e(name)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


if __name__ == "__main__":  # pragma: no cover
    write_report(Path(sys.argv[1]))
