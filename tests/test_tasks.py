"""Tasks beyond one class per text: regression and multi-label labels, their metrics (against scikit-learn
and scipy), a paired bootstrap on any metric, tiny models learning planted scores and label sets, and
prediction for every task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import NEG, NEUTRAL, POS, run_study, study

from peftbench import data, metrics, stats
from peftbench.train import NO_BIAS


# ----------------------------------------------------------------------------------------- metrics
def _cases():
    rng = np.random.default_rng(0)
    y_reg = rng.random(300) * 5
    p_reg = np.round(y_reg + rng.normal(0, 1, 300), 1)  # rounded: ties, as Spearman's ranks must handle
    return [
        ("classification", rng.integers(0, 2, 300), rng.integers(0, 2, 300), 2),
        ("classification", rng.integers(0, 3, 300), np.zeros(300, int), 3),  # two classes never predicted
        ("regression", y_reg, p_reg, 1),
        ("multi_label", rng.integers(0, 2, (300, 4)), rng.integers(0, 2, (300, 4)), 4),
    ]


def test_every_metric_matches_scikit_learn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

    expected = {
        "accuracy": accuracy_score,
        "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
        "mcc": matthews_corrcoef,
        "f1_positive": f1_score,
        "pearson": lambda y, p: pearsonr(y, p).statistic,
        "spearman": lambda y, p: spearmanr(y, p).statistic,
        "mse": mean_squared_error,
        "micro_f1": lambda y, p: f1_score(y, p, average="micro"),
        "exact_match": accuracy_score,
    }
    seen = set()
    for task, y, p, n in _cases():
        got = metrics.score(task, y, p, n)
        for m, value in got.items():
            want = expected[m](y, p)
            if task == "classification" and m == "macro_f1":  # every class counts, predicted or not
                want = f1_score(y, p, labels=list(range(n)), average="macro", zero_division=0)
            assert value == pytest.approx(want), (task, m)
            # the bootstrap's per-item statistics give the same value back from their sums
            summed = metrics.item_stats(task, m, y, p, n).sum(0)
            assert float(metrics.from_stats(m, summed)) == pytest.approx(value), (task, m)
            seen.add(m)
    assert seen == {m for ms in metrics.TASK_METRICS.values() for m in ms}
    assert "mcc" not in metrics.score("classification", np.array([0, 1, 2]), np.array([0, 1, 1]), 3)


def test_predictions_from_logits_per_task():
    logits = np.array([[0.3, -1.0, 2.0], [-0.5, 0.1, -3.0]])
    assert metrics.predict("classification", logits).tolist() == [2, 1]
    assert metrics.predict("multi_label", logits).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert metrics.predict("regression", logits[:, :1]).tolist() == [0.3, -0.5]
    assert metrics.default_metric("regression") == "pearson" and not metrics.higher_is_better("mse")


def test_the_validation_loss_is_the_loss_the_model_trains_on():
    """Per task, the loss of the model's own forward (`problem_type`): cross entropy, MSE, BCE with logits."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (50, 3))
    cases = [
        ("classification", rng.integers(0, 3, 50), lambda t, y: F.cross_entropy(t, torch.tensor(y))),
        ("regression", rng.random(50) * 5, lambda t, y: F.mse_loss(t[:, 0], torch.tensor(y))),
        (
            "multi_label",
            rng.integers(0, 2, (50, 3)),
            lambda t, y: F.binary_cross_entropy_with_logits(t, torch.tensor(y, dtype=t.dtype)),
        ),
    ]
    for task, y, torch_loss in cases:
        assert metrics.loss(task, y, z) == pytest.approx(float(torch_loss(torch.tensor(z), y)), rel=1e-9), (
            task
        )


def test_paired_bootstrap_on_a_correlation_and_on_an_error():
    rng = np.random.default_rng(1)
    y = rng.random(400) * 5
    good = [y + rng.normal(0, 0.5, 400) for _ in range(3)]
    bad = [y + rng.normal(0, 2.0, 400) for _ in range(3)]
    for metric in ("pearson", "spearman", "mse"):
        a = np.array([metrics.item_stats("regression", metric, y, p, 1) for p in good])
        b = np.array([metrics.item_stats("regression", metric, y, p, 1) for p in bad])
        res = stats.paired_bootstrap(a, b, metric, n_boot=1000)
        said = stats.verdict(res["diff"], res["se"], res["p_value"], metric, stats.TIE_MARGIN)
        assert res["p_value"] < 0.01 and said == "better", metric
        null = stats.paired_bootstrap(a, a[[1, 2, 0]], metric, n_boot=1000)
        assert null["p_value"] > 0.05, metric
    assert res["diff"] < 0 and said == "better"  # mse: lower error is better


# ----------------------------------------------------------------------------------------- data
def _planted(n: int, seed: int, task: str) -> pd.DataFrame:
    """Regression: the score is the number of positive words (0-4). Multi-label: `good` when positive words
    are in the text, `bad` when negative ones are (either, both or neither)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 12))]
        if task == "regression":
            cues, label = [rng.choice(POS) for _ in range(i % 5)], float(i % 5)
        else:
            pos, neg = i % 2, (i // 2) % 2
            cues = [rng.choice(POS) for _ in range(2 * pos)] + [rng.choice(NEG) for _ in range(2 * neg)]
            label = [x for x, on in (("good", pos), ("bad", neg)) if on]
        for c in cues:
            words.insert(rng.randrange(len(words) + 1), c)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def _write(folder: Path, task: str, n_train: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _planted(n_train, 1, task).to_parquet(folder / "train.parquet")
    _planted(80, 2, task).to_parquet(folder / "test.parquet")
    return folder


def _spec(path: Path, **over) -> dict:
    from peftbench.config import DATA_DEFAULTS

    return {**DATA_DEFAULTS, "path": str(path), "train_size": 100, "validation_size": 20, **over}


def test_multi_label_reads_lists_delimited_strings_and_zero_one_columns(tmp_path):
    df = _planted(60, 3, "multi_label")
    lists = _write(tmp_path / "lists", "multi_label")
    df.to_parquet(lists / "train.parquet")
    text = tmp_path / "text"
    text.mkdir()
    df.assign(label=[";".join(x) for x in df["label"]]).to_csv(text / "train.csv", index=False)
    cols = tmp_path / "cols"
    cols.mkdir()
    flags = df.assign(
        good=[int("good" in x) for x in df["label"]], bad=[int("bad" in x) for x in df["label"]]
    )
    flags.drop(columns="label").to_csv(cols / "train.tsv", sep="\t", index=False)
    for folder in (text, cols):
        (folder / "test.parquet").write_bytes((lists / "test.parquet").read_bytes())
    pd.read_parquet(lists / "test.parquet").assign(good=0, bad=0).drop(columns="label").to_csv(
        cols / "test.tsv", sep="\t", index=False
    )
    (cols / "test.parquet").unlink()
    a = data.load(_spec(lists, train_size=40, validation_size=10, test_size=None), "multi_label")
    b = data.load(_spec(text, label_separator=";", train_size=40, validation_size=10), "multi_label")
    c = data.load(_spec(cols, label_column=["bad", "good"], train_size=40, validation_size=10), "multi_label")
    assert a.label_names == b.label_names == c.label_names == ["bad", "good"]
    for s in ("train", "validation"):
        assert a.texts[s] == b.texts[s] == c.texts[s]
        assert np.array_equal(a.labels[s], b.labels[s]) and np.array_equal(a.labels[s], c.labels[s])
    assert a.labels["train"].shape == (40, 2) and {0.0, 1.0} == set(np.unique(a.labels["train"]))
    assert (a.labels["train"].sum(1) == 0).any() and (a.labels["train"].sum(1) == 2).any()  # none and both
    assert data.readable_labels(a.labels["train"][:1], a.label_names)[0] in (
        [],
        ["bad"],
        ["good"],
        ["bad", "good"],
    )


def test_regression_labels_are_floats_and_splits_keep_the_score_spread(tmp_path):
    d = data.load(_spec(_write(tmp_path / "r", "regression"), test_size=40), "regression")
    assert d.labels["train"].dtype == np.float32 and d.label_names == ["label"]
    for s in ("train", "validation", "test"):  # quintile strata: every score level in every split
        assert set(np.unique(d.labels[s])) == {0.0, 1.0, 2.0, 3.0, 4.0}, s
    fp = d.fingerprint
    d2 = data.load(_spec(_write(tmp_path / "r", "regression"), test_size=40), "regression")
    assert d2.fingerprint == fp


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_a_tiny_model_learns_the_planted_task_and_predict_agrees(task, tiny_encoder, tmp_path):
    from peftbench.predict import predict_texts

    folder = _write(tmp_path / "d", task, n_train=240)
    # This tiny model learns label sets one label at a time, with a plateau between: 20 epochs at 1e-3
    # after a 10% warm-up learned both at data seeds 0 and 42-44; 8 epochs at 3e-3 (or 20 at 2e-3), with
    # no warm-up, learned one label only at most of them.
    lr, epochs, warmup = (3e-3, 8, 0.0) if task == "regression" else (1e-3, 20, 0.1)
    raw = study(
        tiny_encoder,
        folder,
        [{"name": "full", "learning_rate": lr}, "tfidf"],
        task=task,
        train={"epochs": epochs, "max_length": 24, "warmup_ratio": warmup},
        data={"train_size": 200, "validation_size": 40, "test_size": None},
    )
    full, tfidf = run_study(raw, tmp_path / "s")
    metric = metrics.default_metric(task)
    assert full["status"] == "success" and tfidf["status"] == "success"
    assert full["metrics"][f"test_{metric}"] > 0.8, full["metrics"]
    assert set(full["metrics"]) >= {f"test_{m}" for m in metrics.TASK_METRICS[task]}
    assert all(f"validation_{metric}" in h for h in full["history"])
    assert full["reload_check"]["identical_predictions"] and full["reload_check"]["max_abs_logit_diff"] < 1e-3
    run_dir = tmp_path / "s" / "runs" / full["run_id"]
    saved = pd.read_parquet(run_dir / "predictions.parquet")
    texts = pd.read_parquet(folder / "test.parquet")["text"].tolist()[:5]
    got = predict_texts(run_dir, texts)
    rows = saved.head(5)  # the test split here is the whole test file, in its order
    if task == "regression":
        assert [r["score"] for r in got] == pytest.approx(rows["prediction"].tolist(), abs=1e-3)
    else:
        assert [r["labels"] for r in got] == [list(x) for x in rows["prediction"]]
        assert set(got[0]["probabilities"]) == {"bad", "good"}
    summary = json.loads((tmp_path / "s" / "study.json").read_text())
    assert summary["study"]["metric"] == metric
    from peftbench import report  # predictions that tell something pass the guessing test, shuffled ones not

    loaded = report.load_study(tmp_path / "s")
    run = next(r for r in loaded["finals"] if r["run_id"] == full["run_id"])
    assert report._learned_nothing(loaded, run) is None
    shuffled = list(np.random.default_rng(0).permutation(np.asarray(run["test_predictions"])).tolist())
    assert "learned nothing the test can show" in report._learned_nothing(
        loaded, {**run, "test_predictions": shuffled}
    )


def test_report_and_verdicts_on_a_regression_study(tiny_encoder, tmp_path):
    from peftbench import report

    raw = study(
        tiny_encoder,
        _write(tmp_path / "d", "regression"),
        [{"name": "full", "learning_rate": 3e-3}, "tfidf"],
        task="regression",
        metric="mse",
        seeds=[0, 1],
        train={"epochs": 3, "max_length": 24},
        data={"test_size": None},
    )
    run_study(raw, tmp_path / "s")
    md = report.write_report(tmp_path / "s")["markdown"].read_text()
    assert "| method | MSE (seeds" in md and "Pearson" in md and "Spearman" in md
    assert "## Verdicts (test MSE" in md and "## Per class" not in md
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    best = next(r for r in summary["rows"] if r["best"])
    assert best["score"]["mean"] == min(r["test_mse"]["mean"] for r in summary["rows"])  # lower is better
    assert summary["verdicts"][0]["metric"] == "mse"


# Full fine-tuning learns the planted scores in 8 epochs; LoRA on this tiny model barely moves at 1e-2 and
# at higher rates turns chaotic (rounding differences between the two runs grow without bound): 2 epochs.
# Llama's score head has no bias: scaled only, so scores x20 (and no shift).
@pytest.mark.parametrize(
    "model, method, epochs, shift",
    [
        ("tiny_encoder", {"name": "full", "learning_rate": 3e-3}, 8, 7.0),
        ("tiny_encoder", {"name": "lora", "learning_rate": 1e-2}, 2, 7.0),
        ("tiny_decoder", {"name": "full", "learning_rate": 3e-3}, 4, 0.0),
    ],
)
def test_regression_trains_as_on_standardized_scores_whatever_their_scale(
    request, tmp_path, model, method, epochs, shift
):
    """Scores x20 + 7 train to predictions x20 + 7: the head starts scaled to the training scores and steps
    in proportion, so the scale of the scores changes nothing but the scale of the predictions (a head
    that starts near 0 and steps a learning rate's worth could not reach scores in the tens)."""
    import pandas as pd

    preds = {}
    for name, (a, b) in {"unit": (1.0, 0.0), "wide": (20.0, shift)}.items():
        folder = _write(tmp_path / name, "regression", n_train=240)
        for split in ("train", "test"):
            df = pd.read_parquet(folder / f"{split}.parquet")
            df.assign(label=df["label"] * a + b).to_parquet(folder / f"{split}.parquet")
        raw = study(
            request.getfixturevalue(model),
            folder,
            [method],
            task="regression",
            seeds=[0],
            train={
                "epochs": epochs,
                "max_length": 24,
                "precision": "fp32",
                "max_grad_norm": 1e6,
                "warmup_ratio": 0,
            },
            data={"train_size": 200, "validation_size": 40, "test_size": None},
        )
        (run,) = [r for r in run_study(raw, tmp_path / f"s-{name}") if r["role"] == "final"]
        assert run["metrics"]["score_scale"]["std"] > 0
        preds[name] = np.asarray(run["test_predictions"])
        if name == "unit":
            ys = np.asarray(
                json.loads((tmp_path / "s-unit" / "study.json").read_text())["data"]["test_labels"]
            )
    gap = np.abs((preds["wide"] - shift) / 20 - preds["unit"])  # rounding, compounded over the epochs
    assert gap.max() < 5e-3 and np.median(gap) < 5e-4, (gap.max(), np.median(gap))
    if method["name"] == "full":  # it learned the scores, not just their mean
        assert np.corrcoef(preds["unit"], ys)[0, 1] > 0.5


def test_a_regression_checkpoint_from_before_scaling_is_not_resumed(tiny_encoder, tmp_path, monkeypatch):
    """A checkpoint written before regression heads were scaled holds weights and optimizer groups of the
    unscaled head: the run starts over rather than mixing the two (or failing on the groups)."""
    import torch

    folder = _write(tmp_path / "d", "regression")
    raw = study(
        tiny_encoder,
        folder,
        ["full"],
        task="regression",
        isolation="process",
        train={"epochs": 2},
        checkpoint_every_seconds=0,
    )
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "full:exit_after_epoch=1")
    (killed,) = run_study(raw, tmp_path / "s")
    path = tmp_path / "s" / "runs" / killed["run_id"] / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    assert ck["score_scale"]["standardized"] == "on"
    monkeypatch.delenv("PEFTBENCH_INJECT_FAULT")
    torch.save({k: v for k, v in ck.items() if k != "score_scale"}, path)  # as the older version wrote it
    (again,) = run_study(raw, tmp_path / "s")
    # started over (the warning goes to the worker's stderr, which a test under xdist may not capture)
    assert again["status"] == "success" and again["metrics"]["resumed_from_epoch"] is None


def test_a_head_without_bias_is_scaled_only_and_a_mean_far_from_zero_is_named(tiny_decoder, tmp_path):
    """Llama's score head has no bias to hold the scores' mean: scaled only, said in the result, and a mean
    many standard deviations from 0 (which it must learn in those units) named after the run and in the
    report."""
    from peftbench import report

    folder = _write(tmp_path / "d", "regression")
    for split in ("train", "test"):
        df = pd.read_parquet(folder / f"{split}.parquet")
        df.assign(label=df["label"] + 100).to_parquet(folder / f"{split}.parquet")
    raw = study(tiny_decoder, folder, ["full"], task="regression", seeds=[0], train={"epochs": 1})
    (run,) = [r for r in run_study(raw, tmp_path / "s") if r["role"] == "final"]
    scale = run["metrics"]["score_scale"]
    assert scale["standardized"] == f"scale only: {NO_BIAS}"
    assert scale["mean"] / scale["std"] > 5
    problems = report._problems(report.load_study(tmp_path / "s"))
    assert any(f"trained unstandardized (scale only: {NO_BIAS})" in p for p in problems)
    centred = {**run, "metrics": {"score_scale": {**scale, "mean": 2.0 * scale["std"]}}}
    assert report._unstandardized(centred) is None  # a mean 2 std from 0 is learned
    off = {**run, "metrics": {"score_scale": {**scale, "standardized": "off: why", "mean": 2.0, "std": 1.5}}}
    assert report._unstandardized(off) is None
    assert report._unstandardized({**off, "metrics": {"score_scale": {**scale, "standardized": "off: why"}}})


def test_one_tie_rule_ranks_rates_and_epochs_for_either_direction():
    assert metrics.ranking("accuracy", {3e-4: 0.8, 1e-4: 0.9, 2e-4: 0.9}) == [1e-4, 2e-4, 3e-4]
    assert metrics.ranking("mse", {3: 0.5, 1: 0.7, 2: 0.5}) == [2, 3, 1]  # lower is better; ties: smaller
    history = [{"epoch": e, "validation_mse": v} for e, v in ((1, 0.9), (2, 0.4), (3, 0.4))]
    assert metrics.validation_at(history, 3, True, "mse") == (2, 0.4)


@pytest.mark.parametrize("one_file", [False, True])
def test_multi_label_splits_keep_the_shares_of_each_label_set(tmp_path, one_file):
    """Label sets as strata: () half the rows, (a) 30%, (a, b) 15%, (b) 5%; every split keeps those shares
    to within one row (drawn at random, the 5% set would often miss a 20-row validation split)."""
    sets = [[]] * 200 + [["a"]] * 120 + [["a", "b"]] * 60 + [["b"]] * 20
    rng = random.Random(0)
    rng.shuffle(sets)
    df = pd.DataFrame({"text": [f"text number {i}" for i in range(len(sets))], "label": sets})
    folder = tmp_path / "d"
    folder.mkdir()
    if one_file:  # the test split carved out of one file
        df.to_parquet(folder / "data.parquet")
        spec = _spec(folder / "data.parquet", train_size=200, validation_size=20, test_size=100)
    else:
        df.iloc[:300].to_parquet(folder / "train.parquet")
        df.iloc[300:].to_parquet(folder / "test.parquet")
        spec = _spec(folder, train_size=200, validation_size=20, test_size=60)
    d = data.load(spec, "multi_label")
    shares = {(): 0.5, ("a",): 0.3, ("a", "b"): 0.15, ("b",): 0.05}
    for s in ("train", "validation", "test"):
        got = [tuple(x) for x in data.readable_labels(d.labels[s], d.label_names)]
        for key, share in shares.items():
            assert abs(got.count(key) - share * len(got)) <= 1, (s, key, got.count(key), len(got))
