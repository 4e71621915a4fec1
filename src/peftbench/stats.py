"""Statistics over runs: mean, std and 95% t-intervals over seeds, and paired tests between methods.

Two methods scored on the same test items are compared item by item: with one seed each by an exact
McNemar test on the discordant items, with several seeds by a paired bootstrap that resamples both
test items and seeds.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05


def mean_ci(
    values: list[float], conf: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> dict:
    """Mean, sample std and a t-distribution confidence interval (None where n < 2), cut to the metric's
    possible range `bounds` (an accuracy's interval never leaves [0, 1])."""
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(vals.mean())
    if n < 2:
        return {"mean": mean, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    # Student's t quantile; scipy.stats would add ~1 s of imports to a report
    from scipy.special import (
        stdtrit,
    )

    std = float(vals.std(ddof=1))
    half = float(stdtrit(n - 1, 0.5 + conf / 2) * std / math.sqrt(n))
    return {
        "mean": mean,
        "std": std,
        "ci_low": max(mean - half, bounds[0]),
        "ci_high": min(mean + half, bounds[1]),
        "n": n,
    }


def wilson(p: float, n: int, conf: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `p` observed over `n` items (one seed's accuracy)."""
    from scipy.special import ndtri

    z = float(ndtri(0.5 + conf / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes on the same items."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.special import bdtr  # the binomial CDF

    return float(min(1.0, 2 * bdtr(min(only_a, only_b), n, 0.5)))


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 5000, seed: int = 0) -> dict:
    """Bootstrap the accuracy difference a - b, resampling items and (paired) seeds.

    `correct_a` and `correct_b` are [seeds, items] 0/1 arrays over the same items, seed rows paired.
    """
    a, b = np.asarray(correct_a, float), np.asarray(correct_b, float)
    if a.ndim == 1:
        a, b = a[None], b[None]
    rng = np.random.default_rng(seed)
    n_seeds, n_items = a.shape
    diffs = np.empty(n_boot)
    d = a - b
    for i in range(n_boot):
        s = rng.integers(0, n_seeds, n_seeds)
        it = rng.integers(0, n_items, n_items)
        diffs[i] = d[np.ix_(s, it)].mean()
    observed = float(d.mean())
    p = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    return {
        "diff": observed,
        "ci_low": float(np.quantile(diffs, 0.025)),
        "ci_high": float(np.quantile(diffs, 0.975)),
        "p_value": float(min(1.0, p)),
    }


def paired_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar with one seed per method, a paired bootstrap with several."""
    a, b = np.atleast_2d(correct_a), np.atleast_2d(correct_b)
    if a.shape[0] == 1 and b.shape[0] == 1:
        return {"test": "mcnemar", "diff": float(a.mean() - b.mean()), "p_value": mcnemar(a[0], b[0])}
    k = min(a.shape[0], b.shape[0])
    return {"test": "paired bootstrap (items x seeds)", **paired_bootstrap(a[:k], b[:k])}


METRICS = (
    "test_accuracy",
    "test_macro_f1",
    "test_mcc",  # two classes only (Matthews correlation), as is the positive class's F1
    "test_f1_positive",
    "validation_accuracy",
    "train_seconds",
    "eval_seconds",
    "train_samples_per_second",
    "train_tokens_per_second",
    "trainable_params",
    "total_params",
    "peak_memory_allocated_mb",
    "peak_memory_reserved_mb",
    "peak_device_memory_mb",
    "peak_host_rss_mb",
    "adapter_size_mb",
    "mfu",
)
FRACTIONS = {"test_accuracy", "test_macro_f1", "test_f1_positive", "validation_accuracy", "mfu"}  # in [0, 1]
SIGNED = {"test_mcc"}  # in [-1, 1]; the rest are >= 0


def summarize(final_results: list[dict], test_labels: np.ndarray | None = None) -> list[dict]:
    """One row per method label: status, aggregated metrics over seeds, and significance against the best."""
    by_label: dict[str, list[dict]] = {}
    for r in final_results:
        by_label.setdefault(r["label"], []).append(r)
    rows = []
    for label, runs in by_label.items():
        ok = [r for r in runs if r["status"] == "success"]
        statuses = sorted({r["status"] for r in runs})
        row = {
            "label": label,
            "method": runs[0]["method"],
            "n_runs": len(runs),
            "n_success": len(ok),
            "status": "success" if len(ok) == len(runs) else ("partial" if ok else statuses[0]),
            "errors": sorted({r["error"] for r in runs if r.get("error")}),
            "learning_rate": runs[0].get("learning_rate"),
            "seeds": [r["seed"] for r in ok],
        }
        for m in METRICS:
            bounds = (-1.0, 1.0) if m in SIGNED else (0.0, 1.0 if m in FRACTIONS else math.inf)
            row[m] = mean_ci([r["metrics"].get(m) for r in ok], bounds=bounds)
        row["_correct"] = None
        if test_labels is not None and ok and all(r.get("test_predictions") is not None for r in ok):
            order = sorted(ok, key=lambda r: r["seed"])
            row["_correct"] = np.array([np.asarray(r["test_predictions"]) == test_labels for r in order])
            row["_seeds"] = [r["seed"] for r in order]
        rows.append(row)
    mark_ties(rows)
    return rows


def mark_ties(rows: list[dict]) -> None:
    """Mark rows statistically tied with the most accurate one (paired test, p >= 0.05)."""
    scored = [r for r in rows if r["test_accuracy"]["mean"] is not None]
    if not scored:
        return
    best = max(scored, key=lambda r: r["test_accuracy"]["mean"])
    for r in rows:
        r["best"] = r is best
        r["vs_best"] = None
        r["tied_with_best"] = r is best
        if r is best or r not in scored or r["_correct"] is None or best["_correct"] is None:
            continue
        if r["_correct"].shape[1] != best["_correct"].shape[1]:
            continue
        test = paired_test(best["_correct"], r["_correct"])
        r["vs_best"] = test
        r["tied_with_best"] = test["p_value"] >= ALPHA


def verdicts(rows: list[dict], n_boot: int = 1000) -> list[dict]:
    """For every pair of methods scored on the same test items: better, tied or worse on test accuracy (the
    paired test at ALPHA), and how stable that verdict is: the share of leave-one-seed-out reruns of the
    test that give the same verdict (None with one seed: not assessed). A verdict below 1 is `unstable`."""
    scored = sorted(
        [r for r in rows if r.get("_correct") is not None], key=lambda r: -r["test_accuracy"]["mean"]
    )
    out = []
    for i, a in enumerate(scored):
        for b in scored[i + 1 :]:
            if a["_correct"].shape[1] != b["_correct"].shape[1]:
                continue
            k = min(a["_correct"].shape[0], b["_correct"].shape[0])
            ca, cb = a["_correct"][:k], b["_correct"][:k]
            test = _paired(ca, cb, n_boot)
            verdict = _verdict(test)
            stability = None
            if k > 1:
                kept = [np.arange(k) != j for j in range(k)]
                stability = float(np.mean([_verdict(_paired(ca[m], cb[m], n_boot)) == verdict for m in kept]))
            out.append(
                {
                    "a": a["label"],
                    "b": b["label"],
                    "diff_points": 100 * test["diff"],
                    "p_value": test["p_value"],
                    "test": test["test"],
                    "seeds": k,
                    "verdict": verdict,
                    "stability": stability,
                    "stable": stability is None or stability == 1.0,
                }
            )
    return out


def _paired(ca: np.ndarray, cb: np.ndarray, n_boot: int) -> dict:
    if ca.shape[0] == 1:
        return paired_test(ca, cb)
    return {"test": "paired bootstrap (items x seeds)", **paired_bootstrap(ca, cb, n_boot=n_boot)}


def _verdict(test: dict) -> str:
    if test["p_value"] >= ALPHA:
        return "tied"
    return "better" if test["diff"] > 0 else "worse"


def public(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def time_to_accuracy(history: list[dict], target: float) -> float | None:
    """Training seconds until validation accuracy first reached `target` (None if never)."""
    for h in history:
        if h.get("validation_accuracy") is not None and h["validation_accuracy"] >= target:
            return h.get("cumulative_train_seconds")
    return None
