"""Statistics over runs: mean, std and 95% t-intervals over seeds, and paired tests between methods.

Two methods scored on the same test items are compared item by item on the study's primary metric: on
accuracy with one seed each by an exact McNemar test on the discordant items, otherwise by a paired
bootstrap that resamples test items and seeds. Each pair's verdict (better, worse, tied within the study's
tie margin, or unsettled) comes with the probability that a rerun repeats it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from .metrics import TASK_METRICS, bounds, from_stats, is_fraction, item_stats, oriented

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


def paired_bootstrap(
    stats_a: np.ndarray, stats_b: np.ndarray, metric: str = "accuracy", n_boot: int = 5000, seed: int = 0
) -> dict:
    """Bootstrap the difference a - b in `metric`, resampling test items and (paired) seeds.

    `stats_a` and `stats_b` are [seeds, items, k] per-item statistics (`metrics.item_stats`) over the same
    items, seed rows paired: a resample sums each seed's statistics over the drawn items and recomputes the
    metric from the sums, so any metric resamples, not only a mean over items.
    """
    a, b = _seeds_items(stats_a), _seeds_items(stats_b)
    draws = bootstrap_draws(a.shape[0], a.shape[1], n_boot, seed)
    return bootstrap_difference(a, b, resample(a, metric, draws), resample(b, metric, draws), metric)


def _seeds_items(stats: np.ndarray) -> np.ndarray:
    a = np.asarray(stats, float)
    return a[None] if a.ndim == 2 else a


def bootstrap_draws(n_seeds: int, n_items: int, n_boot: int, seed: int = 0) -> list[tuple]:
    """What `n_boot` bootstrap resamples draw, in chunks of up to 500: how often each item is drawn
    [m, items] and which seeds [m, seeds]. They depend only on the shape and `seed`, so every method
    resampled on the same items and seeds shares them (drawing them is most of a resample's time)."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_boot, 500):
        m = min(500, n_boot - start)
        draws = rng.integers(0, n_items, (m, n_items)) + n_items * np.arange(m)[:, None]
        counts = np.bincount(draws.ravel(), minlength=m * n_items).reshape(m, n_items).astype(float)
        chunks.append((counts, rng.integers(0, n_seeds, (m, n_seeds))))
    return chunks


def resample(stats: np.ndarray, metric: str, draws: list) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap resamples of [seeds, items, k] statistics, as `draws` (`bootstrap_draws` of this shape)
    make them: `metric` per resample and seed [n_boot, seeds], and the seeds each resample draws [n_boot,
    seeds]. Two methods' resamples from the same draws pair up: a study resamples each method once, not
    once for every pair it is in (190 pairs for 20 methods)."""
    a = _seeds_items(stats)
    per_seed = [from_stats(metric, np.tensordot(counts, a, ([1], [1]))) for counts, _ in draws]
    return np.concatenate(per_seed), np.concatenate([seeds for _, seeds in draws])


class Resamples:
    """Summary rows' bootstrap resamples, for many pairs of methods: the draws made once per shape of the
    statistics (seeds, items), and each method resampled once per seed count, shared by every pair it is in.
    `difference(a, b, k)` is `paired_bootstrap` of the two rows' first k seeds, the same figures."""

    def __init__(self, n_boot: int):
        self.n_boot = n_boot
        self.draws: dict[tuple[int, int], list] = {}
        self.resampled: dict[tuple[str, int], tuple] = {}

    def of(self, r: dict, k: int) -> tuple:
        if (r["label"], k) not in self.resampled:
            shape = (k, r["_stats"].shape[1])
            if shape not in self.draws:
                self.draws[shape] = bootstrap_draws(*shape, self.n_boot)
            self.resampled[r["label"], k] = resample(r["_stats"][:k], r["metric"], self.draws[shape])
        return self.resampled[r["label"], k]

    def difference(self, a: dict, b: dict, k: int) -> dict:
        ca, cb = _seeds_items(a["_stats"][:k]), _seeds_items(b["_stats"][:k])
        return bootstrap_difference(ca, cb, self.of(a, k), self.of(b, k), a["metric"])


def bootstrap_difference(a: np.ndarray, b: np.ndarray, res_a: tuple, res_b: tuple, metric: str) -> dict:
    """The paired bootstrap of a - b from both methods' `resample`s (drawn alike).

    Resampling n seeds with replacement spreads their mean by (n-1)/n of the variance that n seeds' mean
    has (the plug-in variance, not the sample variance): at 3 seeds the standard error would come out
    sqrt(2/3) of its size where seeds dominate. So each resample's seed mean is moved from the seeds' mean
    by sqrt(n/(n-1)) times its own deviation (the rescaled bootstrap, Rao and Wu 1988).
    """
    n_seeds = a.shape[0]
    rescale = math.sqrt(n_seeds / (n_seeds - 1)) if n_seeds > 1 else 0.0
    observed = float(np.mean(from_stats(metric, a.sum(1)) - from_stats(metric, b.sum(1))))
    (per_a, seeds), (per_b, _) = res_a, res_b
    per_seed = per_a - per_b  # [n_boot, seeds]
    centre = per_seed.mean(1)
    diffs = centre + rescale * (np.take_along_axis(per_seed, seeds, 1).mean(1) - centre)
    p = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    return {
        "diff": observed,
        "se": float(diffs.std()),
        "ci_low": float(np.quantile(diffs, 0.025)),
        "ci_high": float(np.quantile(diffs, 0.975)),
        "p_value": float(min(1.0, p)),
    }


def paired_test(
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    metric: str = "accuracy",
    n_boot: int = 5000,
    boot: dict | Callable[[], dict] | None = None,
) -> dict:
    """McNemar for accuracy with one seed per method, a paired bootstrap otherwise: `boot`, where it is done
    already or a function gives it, else drawn here."""
    a, b = _seeds_items(stats_a), _seeds_items(stats_b)
    if a.shape[0] == 1 and b.shape[0] == 1 and metric == "accuracy":
        ca, cb = a[0, :, 1], b[0, :, 1]
        return {"test": "mcnemar", "diff": float(ca.mean() - cb.mean()), "p_value": mcnemar(ca, cb)}
    k = min(a.shape[0], b.shape[0])
    return {
        "test": "paired bootstrap (items x seeds)",
        **((boot() if callable(boot) else boot) or paired_bootstrap(a[:k], b[:k], metric, n_boot)),
    }


# Costs and measurements aggregated for every task; each task adds its metrics (test_ and validation_).
COSTS = (
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


def summarize(
    final_results: list[dict],
    test_labels: np.ndarray | None = None,
    task: str = "classification",
    metric: str = "accuracy",
    n_labels: int | None = None,
) -> list[dict]:
    """One row per method label: status, aggregated metrics over seeds, the primary metric as `score`, and
    significance against the best."""
    by_label: dict[str, list[dict]] = {}
    for r in final_results:
        by_label.setdefault(r["label"], []).append(r)
    if test_labels is not None and n_labels is None and task == "classification":
        n_labels = (
            int(max([test_labels.max()] + [max(r.get("test_predictions") or [0]) for r in final_results])) + 1
        )
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
            "metric": metric,
        }
        for m in TASK_METRICS[task]:
            for split in ("test", "validation"):
                row[f"{split}_{m}"] = mean_ci(
                    [r["metrics"].get(f"{split}_{m}") for r in ok], bounds=bounds(m)
                )
        for m in COSTS:
            row[m] = mean_ci([r["metrics"].get(m) for r in ok], bounds=(0.0, 1.0 if m == "mfu" else math.inf))
        row["score"] = row[f"test_{metric}"]
        row["_stats"] = _per_item(ok, test_labels, task, metric, n_labels)
        rows.append(row)
    mark_best(rows)
    return rows


def _per_item(ok: list[dict], test_labels, task: str, metric: str, n_labels) -> np.ndarray | None:
    """[seeds, items, k]: each successful seed's per-item statistics (seed order), what paired tests
    resample; None without every seed's test predictions."""
    if test_labels is None or not ok or any(r.get("test_predictions") is None for r in ok):
        return None
    order = sorted(ok, key=lambda r: r["seed"])
    return np.array(
        [item_stats(task, metric, test_labels, np.asarray(r["test_predictions"]), n_labels) for r in order]
    )


def _rank(r: dict) -> float:
    return oriented(r["metric"], r["score"]["mean"])


def mark_best(rows: list[dict]) -> None:
    """Mark the best row on the primary metric, and the rows the paired test cannot tell from it (p >=
    ALPHA: not significantly different, which is not a tie; see `verdict`)."""
    scored = [r for r in rows if r["score"]["mean"] is not None]
    if not scored:
        return
    best = max(scored, key=_rank)
    boots = Resamples(n_boot=5000)  # the best row resampled once for all its pairs
    for r in rows:
        r["best"] = r is best
        r["vs_best"] = None
        r["indistinct_from_best"] = r is best
        if r is best or r not in scored or r["_stats"] is None or best["_stats"] is None:
            continue
        if r["_stats"].shape[1] != best["_stats"].shape[1]:
            continue
        k = min(r["_stats"].shape[0], best["_stats"].shape[0])
        boot = partial(boots.difference, best, r, k)  # drawn only where the test is a bootstrap
        test = paired_test(best["_stats"], r["_stats"], r["metric"], boot=boot)
        r["vs_best"] = test
        r["indistinct_from_best"] = test["p_value"] >= ALPHA


def against_guessing(task: str, preds, labels) -> dict | None:
    """Whether a run's test predictions tell anything about the labels. Classification: its accuracy
    against `guess`, what answers drawn at random in the shares it gave them would score (the sum over
    classes of its answer share times the class's test share), by one-sided binomial tests (conservative:
    with both shares fixed the count varies less). Multi-label: the same over the (text, label) cells, its
    share of cells answered right against random answers in its own share per label. Regression: Pearson's
    r against 0, one-sided. `p_value` tests for better than guessing (1.0 for a constant answer, which tells
    nothing), `p_below` for worse; None for missing data."""
    from scipy.stats import pearsonr

    if preds is None or labels is None:
        return None
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or len(preds) < 2:
        return None
    if task == "regression":
        if np.ptp(preds) == 0 or np.ptp(labels) == 0:
            return {"pearson": 0.0, "p_value": 1.0, "p_below": 1.0}
        up, down = (pearsonr(preds, labels, alternative=a) for a in ("greater", "less"))
        return {"pearson": float(up.statistic), "p_value": float(up.pvalue), "p_below": float(down.pvalue)}
    if task == "multi_label":
        p, y = preds.astype(bool).mean(0), labels.astype(bool).mean(0)
        guess = float(np.mean(p * y + (1 - p) * (1 - y)))
    else:
        guess = float(sum(np.mean(preds == c) * np.mean(labels == c) for c in np.union1d(preds, labels)))
    return _binomial_against(int(np.sum(preds == labels)), preds.size, guess, (preds == preds[0]).all())


def _binomial_against(hits: int, n: int, guess: float, constant: bool) -> dict:
    from scipy.stats import binomtest

    if constant:
        return {"accuracy": hits / n, "guess": guess, "p_value": 1.0, "p_below": 1.0}
    p, below = (float(binomtest(hits, n, guess, alternative=a).pvalue) for a in ("greater", "less"))
    return {"accuracy": hits / n, "guess": guess, "p_value": p, "p_below": below}


# A verdict is stable when a rerun would give it again with at least this probability (three in four).
STABLE = 0.75
# The default tie margin: differences that cannot matter to a practitioner, in the metric's units (1 point).
TIE_MARGIN = 0.01


def verdict(diff: float, se: float, p_value: float, metric: str, margin: float) -> str:
    """`tied` when the difference's 90% interval lies within +-margin (two one-sided tests at ALPHA: an
    equivalence shown, not a difference missed), else `better` or `worse` when the paired test finds one
    (p < ALPHA), else `unsettled`: these results can tell neither a difference nor a tie."""
    from scipy.special import ndtri

    if abs(diff) + float(ndtri(1 - ALPHA)) * se < margin:
        return "tied"
    if p_value < ALPHA:
        return "better" if oriented(metric, diff) > 0 else "worse"
    return "unsettled"


def replication(said: str, diff: float, se: float, metric: str, margin: float) -> float | None:
    """The probability that a rerun of the study (new seeds, new test items from the same source) gives the
    verdict this one gave (`said`); None for `unsettled`, which claims nothing to repeat. Under a flat prior
    on the true difference, the rerun's estimate is normal around this one's with twice its variance (this
    run's noise and the rerun's own, taken to be as large); the rerun's verdict follows from its estimate
    as `verdict` rules. A difference at p = 0.05 reruns as one about half the time; a tie reruns as a tie only
    when the interval sits well inside the margin."""
    from scipy.special import ndtr, ndtri

    if said == "unsettled":
        return None
    if se <= 0:
        return 1.0
    d, spread = oriented(metric, diff), math.sqrt(2) * se
    room = margin - float(ndtri(1 - ALPHA)) * se  # a rerun's |estimate| below this is a tie
    edge = max(float(ndtri(1 - ALPHA / 2)) * se, room)  # beyond this, better or worse
    chance = {
        "tied": float(ndtr((room - d) / spread) - ndtr((-room - d) / spread)) if room > 0 else 0.0,
        "better": float(1 - ndtr((edge - d) / spread)),
        "worse": float(ndtr((-edge - d) / spread)),
    }
    return chance[said]


def verdicts(rows: list[dict], margin: float = TIE_MARGIN, n_boot: int = 4000) -> list[dict]:
    """For every pair of methods scored on the same test items: better, worse, tied (within +-margin) or
    unsettled on the primary metric (`verdict`), and how stable that verdict is: the probability that a
    rerun gives it again (`replication`; None with one seed: not assessed). An unsettled verdict, or one
    below STABLE, is not `stable`."""
    scored = sorted([r for r in rows if r.get("_stats") is not None], key=lambda r: -_rank(r))
    boots = Resamples(n_boot)
    out = []
    for i, a in enumerate(scored):
        for b in scored[i + 1 :]:
            if a["_stats"].shape[1] != b["_stats"].shape[1]:
                continue
            k = min(a["_stats"].shape[0], b["_stats"].shape[0])
            out.append(_pair(a, b, k, margin, boots.difference(a, b, k)))
    return out


def _pair(a: dict, b: dict, k: int, margin: float, boot: dict) -> dict:
    metric = a["metric"]
    test = paired_test(a["_stats"][:k], b["_stats"][:k], metric, boot=boot)
    se = boot["se"]
    said = verdict(test["diff"], se, test["p_value"], metric, margin)
    stability = replication(said, test["diff"], se, metric, margin) if k > 1 else None
    return {
        "a": a["label"],
        "b": b["label"],
        "metric": metric,
        "diff": test["diff"],
        "diff_points": 100 * test["diff"] if is_fraction(metric) else None,
        "se": se,
        "p_value": test["p_value"],
        "test": test["test"],
        "seeds": k,
        "margin": margin,
        "verdict": said,
        "stability": stability,
        "stable": said != "unsettled" and (stability is None or stability >= STABLE),
    }


def public(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def time_to_reach(history: list[dict], metric: str, target: float) -> float | None:
    """Training seconds until the validation `metric` first reached `target` (None if never)."""
    key = f"validation_{metric}"
    for h in history:
        if h.get(key) is not None and oriented(metric, h[key]) >= oriented(metric, target):
            return h.get("cumulative_train_seconds")
    return None
