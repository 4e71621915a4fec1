"""The classical floor every transformer method must beat: TF-IDF (1-2 grams) + a linear model (logistic
regression for classes, one per label for multi-label, ridge regression for scores)."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .artefacts import dir_size_mb, write_predictions
from .metrics import loss, predict, score
from .spec import RunSpec


def _pipeline(spec: RunSpec):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline

    opts = spec.method_options
    linear = {
        "classification": lambda: LogisticRegression(
            C=opts.get("C", 1.0), max_iter=2000, random_state=spec.seed
        ),
        "multi_label": lambda: OneVsRestClassifier(LogisticRegression(C=opts.get("C", 1.0), max_iter=2000)),
        "regression": lambda: Ridge(alpha=1.0 / opts.get("C", 1.0)),
    }[spec.task]()
    vectorizer = TfidfVectorizer(
        ngram_range=(1, opts.get("ngram_max", 2)),
        min_df=2,
        sublinear_tf=True,
        max_features=opts.get("max_features", 200_000),
    )
    return make_pipeline(vectorizer, linear)


def tfidf_logits(pipe, task: str, texts: list[str]) -> np.ndarray:
    """What a transformer head would output: log-probabilities (softmax gives them back), per-label
    log-odds (sigmoid does), or the score as one column."""
    if task == "regression":
        return np.asarray(pipe.predict(texts), dtype=np.float64)[:, None]
    p = np.clip(pipe.predict_proba(texts), 1e-12, 1 - 1e-12)
    return np.log(p) if task == "classification" else np.log(p) - np.log1p(-p)


def _n_params(pipe) -> int:
    last = pipe[-1]
    models = getattr(last, "estimators_", [last])
    return int(sum(np.size(m.coef_) + np.size(m.intercept_) for m in models))


def tfidf_run(spec: RunSpec, texts: dict, labels: dict, label_names: list[str], run_dir: Path) -> dict:
    """The classical floor, measured like any other run."""
    import joblib

    pipe = _pipeline(spec)
    task, n = spec.task, len(label_names)
    t0 = time.perf_counter()
    pipe.fit(texts["train"], labels["train"])
    train_s = time.perf_counter() - t0
    logits = tfidf_logits(pipe, task, texts["validation"])
    val = score(task, labels["validation"], predict(task, logits), n)
    val = {f"validation_{k}": v for k, v in val.items()}
    val["validation_loss"] = loss(task, labels["validation"], logits)
    metrics = {
        **val,
        "selected_epoch": None,
        "train_seconds": train_s,
        "train_samples_per_second": len(texts["train"]) / train_s,
        "train_tokens_per_second": None,
        "trainable_params": _n_params(pipe),
        "total_params": _n_params(pipe),
        "trainable_percent": 100.0,
        "precision": "fp64",
        "peak_memory_allocated_mb": None,
        "peak_memory_reserved_mb": None,
    }
    preds = None
    if spec.evaluate_test:
        t1 = time.perf_counter()
        logits = tfidf_logits(pipe, task, texts["test"])
        preds = predict(task, logits)
        metrics["eval_seconds"] = time.perf_counter() - t1
        metrics.update({f"test_{k}": v for k, v in score(task, labels["test"], preds, n).items()})
        metrics["eval_samples_per_second"] = len(preds) / metrics["eval_seconds"]
        write_predictions(
            run_dir / "predictions.parquet", spec.runtime.test_rows_file, logits, label_names, task
        )
    metrics["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (run_dir / "model").mkdir(exist_ok=True)
    joblib.dump(pipe, run_dir / "model" / "tfidf_logreg.joblib")
    metrics["adapter_size_mb"] = dir_size_mb(run_dir / "model")
    history = {
        "epoch": 1,
        "train_loss": None,
        **val,
        "epoch_seconds": train_s,
        "cumulative_train_seconds": train_s,
    }
    return {
        "metrics": metrics,
        "history": [history],
        "artefact": "model",
        "reload_check": None,
        "test_predictions": preds.tolist() if preds is not None else None,
    }
