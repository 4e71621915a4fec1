"""What a run is scored by: each task's metrics (computed by scikit-learn and scipy), the per-item statistics
that let a paired bootstrap recompute any of them on resampled items, and model FLOPs.

A task's labels: `classification` one class id per text; `regression` one float; `multi_label` a 0/1 row
over the label set. A metric `m` is stored as `validation_m` and `test_m`.
"""

from __future__ import annotations

import numpy as np

TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc", "f1_positive"),  # mcc, f1_positive: two classes only
    "regression": ("pearson", "spearman", "mse"),
    "multi_label": ("micro_f1", "macro_f1", "exact_match"),
}
TASKS = tuple(TASK_METRICS)
LOWER_IS_BETTER = {"mse"}
SIGNED = {"mcc", "pearson", "spearman"}  # in [-1, 1]; mse in [0, inf); the rest in [0, 1]
# How the Hugging Face model heads name each task (config.problem_type): the loss follows from it.
PROBLEM_TYPES = {
    "classification": "single_label_classification",
    "regression": "regression",
    "multi_label": "multi_label_classification",
}


# What scoring imports, beyond this module: about a second on a 2-core CPU.
DEPENDENCIES = ("scipy.special", "scipy.stats", "sklearn.metrics")


def import_dependencies(names=DEPENDENCIES) -> None:
    """Import `names` (by default what scoring will) ahead of their first use, the first validation's. A
    failure is left for that use to raise and explain."""
    import importlib

    try:
        for name in names:
            importlib.import_module(name)
    except Exception:
        pass


def import_dependencies_soon() -> None:
    """`import_dependencies` in a thread, unless done already. A run starts it once its model is loaded: the
    forkserver would import them before any run could start, and beside a model load they slow it."""
    import sys
    import threading

    if "sklearn.metrics" not in sys.modules:
        threading.Thread(target=import_dependencies, name="metrics-imports", daemon=True).start()


def default_metric(task: str) -> str:
    """The primary metric when a study names none: accuracy, Pearson, micro-F1."""
    return TASK_METRICS[task][0]


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def oriented(metric: str, value: float) -> float:
    """The value with larger meaning better, for ranking."""
    return value if higher_is_better(metric) else -value


def ranking(metric: str, values: dict) -> list:
    """The keys of `values` best first by `metric`; among equals the smaller key first (the lower learning
    rate, the earlier epoch): the one tie rule of every choice peftbench makes."""
    return sorted(values, key=lambda k: (-oriented(metric, values[k]), k))


def bounds(metric: str) -> tuple[float, float]:
    """The metric's possible range: intervals are cut to it."""
    if metric in SIGNED:
        return -1.0, 1.0
    return (0.0, float("inf")) if metric == "mse" else (0.0, 1.0)


def is_fraction(metric: str) -> bool:
    """A share of items or a correlation: differences read in points (x100)."""
    return metric != "mse"


def num_outputs(task: str, label_names: list[str]) -> int:
    """The model head's width: one score for regression, one logit per class or label otherwise."""
    return 1 if task == "regression" else len(label_names)


def predict(task: str, logits: np.ndarray) -> np.ndarray:
    """Predictions from logits: the class id, the score, or the 0/1 label row (logit > 0, p > 0.5)."""
    logits = np.asarray(logits)
    if task == "regression":
        return logits[:, 0].astype(np.float64)
    if task == "multi_label":
        return (logits > 0).astype(np.int64)
    return logits.argmax(-1)


def probabilities(task: str, logits: np.ndarray) -> np.ndarray | None:
    """Class probabilities (softmax), per-label probabilities (sigmoid), none for scores."""
    from scipy.special import expit, softmax

    if task == "regression":
        return None
    return expit(logits) if task == "multi_label" else softmax(np.asarray(logits, np.float64), axis=-1)


def loss(task: str, labels: np.ndarray, logits: np.ndarray) -> float:
    """The mean of the loss the model trains on (`PROBLEM_TYPES`): cross entropy over the classes, mean
    squared error of the score, binary cross entropy per label."""
    from scipy.special import log_expit, log_softmax

    z = np.asarray(logits, np.float64)
    if task == "regression":
        return float(((z[:, 0] - np.asarray(labels, np.float64)) ** 2).mean())
    if task == "multi_label":
        y = np.asarray(labels, np.float64)
        return float(-(y * log_expit(z) + (1 - y) * log_expit(-z)).mean())
    return float(-log_softmax(z, axis=-1)[np.arange(len(z)), np.asarray(labels, int)].mean())


def score(task: str, labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """Every metric of the task (names without the split prefix)."""
    if task == "regression":
        return _regression(np.asarray(labels, float), np.asarray(preds, float))
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task == "multi_label":
        y, p = np.asarray(labels, int), np.asarray(preds, int)
        return {
            "micro_f1": float(f1_score(y, p, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y, p, average="macro", zero_division=0)),
            "exact_match": float(accuracy_score(y, p)),
        }
    out = {
        "accuracy": float((preds == labels).mean()),
        # over every class, a class never predicted counting 0
        "macro_f1": float(
            f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)
        ),
    }
    if num_labels == 2:
        out["mcc"] = float(matthews_corrcoef(labels, preds))
        out["f1_positive"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))  # as MRPC reports
    return out


def _regression(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman (a constant prediction correlates 0) and MSE."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    constant = np.ptp(p) == 0 or np.ptp(y) == 0
    return {
        "pearson": 0.0 if constant else float(pearsonr(y, p).statistic),
        "spearman": 0.0 if constant else float(spearmanr(y, p).statistic),
        "mse": float(mean_squared_error(y, p)),
    }


def item_stats(task: str, metric: str, labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """[items, k]: per test item, the counts whose sums over any multiset of items give `metric` on it
    (`from_stats`), so a paired bootstrap can recompute the metric on resampled items. Column 0 counts
    items. Spearman's resamples keep the full set's ranks."""
    one = np.ones(len(labels))
    if metric in ("pearson", "spearman"):
        y, p = np.asarray(labels, float), np.asarray(preds, float)
        if metric == "spearman":
            from scipy.stats import rankdata

            y, p = rankdata(y), rankdata(p)
        y, p = y - y.mean(), p - p.mean()
        return np.column_stack([one, p, y, p * p, y * y, p * y])
    if metric == "mse":
        return np.column_stack([one, (np.asarray(preds, float) - np.asarray(labels, float)) ** 2])
    if metric in ("accuracy", "exact_match"):
        equal = np.asarray(preds) == np.asarray(labels)
        return np.column_stack([one, equal if equal.ndim == 1 else equal.all(1)])
    y, p = _indicators(task, labels, preds, num_labels)
    tp, fp, fn = y * p, (1 - y) * p, y * (1 - p)
    if metric == "micro_f1":
        return np.column_stack([one, tp.sum(1), fp.sum(1), fn.sum(1)])
    if metric in ("f1_positive", "mcc"):
        return np.column_stack([one, tp[:, 1], fp[:, 1], fn[:, 1]])
    return np.column_stack([one, tp, fp, fn])  # macro_f1


def _indicators(task: str, labels, preds, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """[items, classes] 0/1 rows: one-hot for classes, the label rows for multi-label."""
    if task == "multi_label":
        return np.asarray(labels, float), np.asarray(preds, float)
    eye = np.eye(num_labels)
    return eye[np.asarray(labels, int)], eye[np.asarray(preds, int)]


def from_stats(metric: str, s: np.ndarray) -> np.ndarray:
    """The metric from summed `item_stats` ([..., k] -> [...])."""
    n = s[..., 0]
    if metric in ("accuracy", "exact_match", "mse"):
        return s[..., 1] / n
    if metric in ("pearson", "spearman"):
        sp, sy, spp, syy, spy = (s[..., i] for i in range(1, 6))
        var = (spp - sp * sp / n) * (syy - sy * sy / n)
        return np.where(var > 0, (spy - sp * sy / n) / np.sqrt(np.where(var > 0, var, 1)), 0.0)
    if metric in ("micro_f1", "f1_positive"):
        return _f1(s[..., 1], s[..., 2], s[..., 3])
    if metric == "mcc":
        tp, fp, fn = s[..., 1], s[..., 2], s[..., 3]
        tn = n - tp - fp - fn
        denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
        return np.where(denom > 0, (tp * tn - fp * fn) / np.sqrt(np.where(denom > 0, denom, 1)), 0.0)
    c = (s.shape[-1] - 1) // 3  # macro_f1: the mean over classes
    return _f1(s[..., 1 : 1 + c], s[..., 1 + c : 1 + 2 * c], s[..., 1 + 2 * c :]).mean(-1)


def _f1(tp, fp, fn):
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def validation_at(
    history: list[dict], epochs: int, best: bool, metric: str = "accuracy"
) -> tuple[int, float]:
    """The epoch that counts after `epochs` epochs and its validation `metric`: the best so far with `best`
    (the earliest of equals), else the last."""
    key = f"validation_{metric}"
    vals = {h["epoch"]: h[key] for h in history if h["epoch"] <= epochs}
    chosen = ranking(metric, vals)[0] if best else epochs
    return chosen, vals[chosen]


def model_flops_per_token(config, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (the usual MFU convention)."""
    h = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    inter = getattr(config, "intermediate_size", 4 * h)
    if not h or not layers:
        return 0.0
    n_params = layers * (4 * h * h + 2 * h * inter)
    return 6 * n_params + 12 * layers * h * seq_len
