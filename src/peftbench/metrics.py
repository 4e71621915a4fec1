"""What a run's predictions and steps are scored by: classification metrics and model FLOPs."""

from __future__ import annotations

import numpy as np


def score_predictions(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (over every class, a class never predicted counting 0); for two classes also
    Matthews correlation and F1 of the positive class (the second label, as GLUE's MRPC reports it)."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    out = {
        "test_accuracy": float((preds == labels).mean()),
        "test_macro_f1": float(
            f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)
        ),
    }
    if num_labels == 2:
        out["test_mcc"] = float(matthews_corrcoef(labels, preds))
        out["test_f1_positive"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))
    return out


def validation_at(history: list[dict], epochs: int, best: bool) -> tuple[int, float]:
    """The epoch that counts after `epochs` epochs and its validation accuracy: the best so far with
    `best` (the earliest of equals), else the last."""
    accs = {h["epoch"]: h["validation_accuracy"] for h in history if h["epoch"] <= epochs}
    chosen = max(accs, key=lambda e: (accs[e], -e)) if best else epochs
    return chosen, accs[chosen]


def model_flops_per_token(config, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (the usual MFU convention)."""
    h = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    inter = getattr(config, "intermediate_size", 4 * h)
    if not h or not layers:
        return 0.0
    n_params = layers * (4 * h * h + 2 * h * inter)
    return 6 * n_params + 12 * layers * h * seq_len
