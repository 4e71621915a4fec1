"""What a run's predictions and steps are scored by: classification metrics and model FLOPs."""

from __future__ import annotations

import numpy as np


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> float:
    f1s = []
    for c in range(num_labels):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def model_flops_per_token(config, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (the usual MFU convention)."""
    h = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    inter = getattr(config, "intermediate_size", 4 * h)
    if not h or not layers:
        return 0.0
    n_params = layers * (4 * h * h + 2 * h * inter)
    return 6 * n_params + 12 * layers * h * seq_len
