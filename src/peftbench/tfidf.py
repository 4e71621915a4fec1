"""The classical floor every transformer method must beat: TF-IDF (1-2 grams) + logistic regression."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .artefacts import dir_size_mb, write_predictions
from .metrics import score_predictions
from .spec import RunSpec


def tfidf_run(spec: RunSpec, texts: dict, labels: dict, label_names: list[str], run_dir: Path) -> dict:
    """The classical floor: TF-IDF (1-2 grams) + logistic regression, measured like any other run."""
    import joblib
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    opts = spec.method_options
    pipe = make_pipeline(
        TfidfVectorizer(
            ngram_range=(1, opts.get("ngram_max", 2)),
            min_df=2,
            sublinear_tf=True,
            max_features=opts.get("max_features", 200_000),
        ),
        LogisticRegression(C=opts.get("C", 1.0), max_iter=2000, random_state=spec.seed),
    )
    t0 = time.perf_counter()
    pipe.fit(texts["train"], labels["train"])
    train_s = time.perf_counter() - t0
    val_acc = float((pipe.predict(texts["validation"]) == labels["validation"]).mean())
    metrics = {
        "validation_accuracy": val_acc,
        "selected_epoch": None,
        "train_seconds": train_s,
        "train_samples_per_second": len(texts["train"]) / train_s,
        "train_tokens_per_second": None,
        "trainable_params": int(pipe[-1].coef_.size + pipe[-1].intercept_.size),
        "total_params": int(pipe[-1].coef_.size + pipe[-1].intercept_.size),
        "trainable_percent": 100.0,
        "precision": "fp64",
        "peak_memory_allocated_mb": None,
        "peak_memory_reserved_mb": None,
    }
    preds = None
    if spec.evaluate_test:
        t1 = time.perf_counter()
        preds = pipe.predict(texts["test"])
        metrics["eval_seconds"] = time.perf_counter() - t1
        metrics.update(score_predictions(labels["test"], preds, len(label_names)))
        metrics["eval_samples_per_second"] = len(preds) / metrics["eval_seconds"]
        log_probs = np.log(np.clip(pipe.predict_proba(texts["test"]), 1e-12, 1.0))  # softmax gives them back
        write_predictions(
            run_dir / "predictions.parquet", spec.runtime.test_rows_file, log_probs, label_names
        )
    metrics["peak_host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (run_dir / "model").mkdir(exist_ok=True)
    joblib.dump(pipe, run_dir / "model" / "tfidf_logreg.joblib")
    metrics["adapter_size_mb"] = dir_size_mb(run_dir / "model")
    return {
        "metrics": metrics,
        "history": [
            {
                "epoch": 1,
                "train_loss": None,
                "validation_accuracy": val_acc,
                "epoch_seconds": train_s,
                "cumulative_train_seconds": train_s,
            }
        ],
        "artefact": "model",
        "reload_check": None,
        "test_predictions": preds.tolist() if preds is not None else None,
    }
