"""Statistics on known inputs, the Pareto front and recommendations on constructed results, the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_study, study

from peftbench import report, stats, store
from peftbench.metrics import TASK_METRICS


# ----------------------------------------------------------------------------------------- statistics
def test_mean_ci_known_values():
    r = stats.mean_ci([0.80, 0.82, 0.84])
    assert r["mean"] == pytest.approx(0.82) and r["std"] == pytest.approx(0.02)
    # t(0.975, 2) = 4.3027; half-width = 4.3027 * 0.02 / sqrt(3)
    assert r["ci_high"] - r["mean"] == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)
    one = stats.mean_ci([0.5])
    assert one["mean"] == 0.5 and one["ci_low"] is None
    assert stats.mean_ci([])["mean"] is None
    wide = stats.mean_ci([0.3, 0.7], bounds=(0.0, 1.0))  # t(0.975, 1) = 12.7: the raw interval is [-2.2, 3.2]
    assert (wide["ci_low"], wide["ci_high"]) == (0.0, 1.0)
    assert stats.mean_ci([0.3, 0.7])["ci_low"] < -2


def test_summaries_keep_accuracy_intervals_inside_zero_one():
    runs = [
        {
            "label": "m",
            "method": "full",
            "status": "success",
            "seed": s,
            "metrics": {"test_accuracy": a, "train_seconds": t},
        }
        for s, a, t in ((0, 0.3, 1.0), (1, 0.7, 9.0))
    ]
    (row,) = stats.summarize(runs)
    assert (row["test_accuracy"]["ci_low"], row["test_accuracy"]["ci_high"]) == (0.0, 1.0)
    assert row["train_seconds"]["ci_low"] == 0.0 and row["train_seconds"]["ci_high"] > 9.0


def test_mcnemar_known_answers():
    a = np.array([1] * 50 + [0] * 50, bool)
    assert stats.mcnemar(a, a) == 1.0  # identical predictions: no evidence at all
    b = a.copy()
    b[:10] = False  # a right and b wrong on 10 items, never the reverse
    assert stats.mcnemar(a, b) == pytest.approx(2 * 0.5**10)
    c = a.copy()
    c[:3], c[50:53] = False, True  # 3 discordant each way: perfectly balanced
    assert stats.mcnemar(a, c) == 1.0


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.random((3, 400)) < 0.8
    better = base.copy()
    better[:, :60] = True  # strictly better on a block of items
    res = stats.paired_bootstrap(_acc_stats(better), _acc_stats(base))
    assert res["diff"] > 0 and res["ci_low"] > 0 and res["p_value"] < 0.01
    noise = rng.random((3, 400)) < 0.8
    null = stats.paired_bootstrap(_acc_stats(noise), _acc_stats(noise[[1, 2, 0]]))
    assert null["ci_low"] < 0 < null["ci_high"] and null["p_value"] > 0.05


def test_the_bootstrap_spreads_a_few_seeds_mean_by_its_sample_variance_not_less():
    """Where seeds dominate (3 seeds whose differences are 0, 2 and 4 points on 20,000 items), the standard
    error is the seeds' sample standard deviation over sqrt(3), 1.15 points: not sqrt(2/3) of it, as
    plain resampling of 3 seeds would give."""
    items = 20_000
    base = np.zeros((3, items), bool)
    base[:, : items // 2] = True
    ahead = base.copy()
    for seed, points in enumerate((0, 2, 4)):
        ahead[seed, items // 2 : items // 2 + items * points // 100] = True
    res = stats.paired_bootstrap(_acc_stats(ahead), _acc_stats(base), n_boot=8000)
    assert res["diff"] == pytest.approx(0.02)
    assert res["se"] == pytest.approx(0.02 / np.sqrt(3), rel=0.06)
    one = stats.paired_bootstrap(_acc_stats(ahead[:1]), _acc_stats(base[:1]))  # one seed: items only
    assert one["diff"] == 0.0 and one["se"] == 0.0


def _acc_stats(correct: np.ndarray) -> np.ndarray:
    """[seeds, items] 0/1 correctness as accuracy's per-item statistics (metrics.item_stats)."""
    return np.stack([np.ones(correct.shape), correct.astype(float)], -1)


def _row(label, acc, secs, params, mem, correct=None, seeds=1):
    r = {
        "label": label,
        "method": label,
        "status": "success",
        "errors": [],
        "learning_rate": 1e-3,
        "seeds": list(range(seeds)),
        "metric": "accuracy",
        "_stats": None if correct is None else _acc_stats(correct),
    }
    for m in stats.COSTS + tuple(
        f"{s}_{m}" for m in TASK_METRICS["classification"] for s in ("test", "validation")
    ):
        r[m] = stats.mean_ci([])
    r["test_accuracy"] = r["score"] = stats.mean_ci([acc])
    r["train_seconds"] = stats.mean_ci([secs])
    r["trainable_params"] = stats.mean_ci([params])
    r["peak_memory_allocated_mb"] = stats.mean_ci([mem])
    return r


def test_best_marks_on_constructed_predictions():
    labels = np.zeros(300, int)
    best = np.ones((1, 300), bool)
    best[0, :30] = False  # 0.90
    close = best.copy()
    close[0, 30:33] = False  # 0.89: 3 discordant items
    far = best.copy()
    far[0, 30:90] = False  # 0.70: 60 discordant items
    rows = [
        _row("a", 0.90, 10, 1e6, 100, best),
        _row("b", 0.89, 5, 1e3, 50, close),
        _row("c", 0.70, 1, 10, 10, far),
    ]
    stats.mark_best(rows)
    assert rows[0]["best"] and rows[1]["indistinct_from_best"] and not rows[2]["indistinct_from_best"]
    assert rows[2]["vs_best"]["p_value"] < 1e-6
    del labels


def test_a_plot_is_drawn_once_as_it_is_saved(tmp_path, monkeypatch):
    """A report's plot is laid out by tight_layout and then drawn once, into its PNG file: savefig does not
    lay it out again in a draw of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    draws, draw = [], Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: draws.append(1) or draw(self, renderer))
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    ax.set(xlabel="a long label for the layout to make room for", ylabel="accuracy")
    assert report._save(fig, tmp_path / "p.png").stat().st_size > 0
    assert len(draws) == 1, draws


def test_pareto_front():
    pts = [("a", 10, 0.90), ("b", 5, 0.85), ("c", 6, 0.80), ("d", 20, 0.90), ("e", 1, 0.50)]
    assert report.pareto_front(pts) == ["a", "b", "e"]


def _study(rows, gpu=True):
    return {
        "rows": rows,
        "gpu": gpu,
        "name": "t",
        "finals": [],
        "trials": [],
        "plan": None,
        "task": "classification",
        "metric": "accuracy",
        "tie_margin": stats.TIE_MARGIN,
    }


def test_recommendations_follow_the_numbers():
    rows = [
        _row("full", 0.93, 1755, 124.6e6, 11559),
        _row("lora", 0.925, 842, 1.48e6, 9331),
        _row("qlora", 0.89, 252, 296e3, 4678),
        _row("ia3", 0.8225, 1465, 1.3e6, 12185),
    ]
    for r in rows:
        r["indistinct_from_best"] = False
    recs = {r["title"]: r for r in report.recommendations(_study(rows))}
    assert recs["Best accuracy"]["method"] == "full" and "0.9300" in recs["Best accuracy"]["reason"]
    fastest = next(v for k, v in recs.items() if k.startswith("Fastest"))
    assert fastest["method"] == "lora" and "842.0 s" in fastest["reason"]
    fewest = next(v for k, v in recs.items() if k.startswith("Fewest"))
    assert fewest["method"] == "lora"
    budgets = [(k, v["method"]) for k, v in recs.items() if k.startswith("Best within")]
    assert budgets == [
        ("Best within 4,678 MB of peak GPU memory", "qlora"),
        ("Best within 9,331 MB of peak GPU memory", "lora"),
        ("Best within 11,559 MB of peak GPU memory", "full"),
    ]
    strict = _study(rows)
    strict["tie_margin"] = 0.002  # LoRA's 0.5-point gap is no longer near the best
    recs = {r["title"]: r for r in report.recommendations(strict)}
    assert recs["Fastest within 0.2 points of the best (or not significantly different)"]["method"] == "full"


def test_memory_budgets_are_named_by_the_winners_own_peaks():
    """LoRA on all layers peaked 4% above full fine-tuning and scored better: closer than peaks are told
    apart, so one line names it, at its own peak (not at the next method's, as "Best within 2,388 MB")."""
    rows = [  # the all-methods study's peaks and accuracies (results/all-methods-minilm-h200)
        _row("head", 0.733, 10, 1e5, 792),
        _row("bitfit", 0.8765, 10, 1e5, 1246),
        _row("ln_tuning", 0.877, 10, 1e5, 1302),
        _row("oft", 0.892, 10, 1e5, 1372),  # 10.1% above bitfit: a line of its own
        _row("full", 0.896, 10, 1e5, 1758),
        _row("lora_all", 0.898, 10, 1e5, 1836),
        _row("lora", 0.89, 10, 1e5, 2388),
    ]
    recs = [r for r in report.recommendations(_study(rows)) if r["title"].startswith("Best within")]
    assert [(r["title"].split(" MB")[0], r["method"]) for r in recs] == [
        ("Best within 792", "head"),
        ("Best within 1,302", "ln_tuning"),
        ("Best within 1,372", "oft"),
        ("Best within 1,836", "lora_all"),
    ]
    assert "full peaked within 10% of that, at 1,758 MB (accuracy 0.8960)" in recs[-1]["reason"]


def test_recommend_constraints_and_binding_one():
    rows = [
        _row("full", 0.93, 1755, 124.6e6, 11559),
        _row("lora", 0.904, 842, 1.48e6, 9331),
        _row("qlora", 0.89, 252, 296e3, 4678),
    ]
    s = _study(rows)
    res = report.recommend(s, report.parse_memory("10GB"), report.parse_duration("20m"), None)
    assert [r["method"] for r in res["ranked"]] == ["lora", "qlora"]
    res = report.recommend(s, report.parse_memory("5GB"), None, 0.9)
    assert res["ranked"] == []
    assert any(line.startswith("--min-score is binding: without it, qlora") for line in res["binding"])
    assert any(line.startswith("--max-memory is binding: without it, full") for line in res["binding"])
    assert report.parse_memory("500MB") == 500 and report.parse_duration("1h") == 3600
    with pytest.raises(Exception, match="--max-memory"):
        report.parse_memory("lots")


# ----------------------------------------------------------------------------------------- the report
def test_report_with_failed_skipped_and_hostile_labels(
    tiny_encoder, tiny_data, tmp_path, monkeypatch, capsys
):
    evil = "<script>alert(1)</script>"
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "ia3:segv")
    raw = study(
        tiny_encoder,
        tiny_data,
        [{"name": "lora", "label": evil}, "ia3", "full"],
        isolation="process",
        train={"epochs": 1},
        name="x<b>y</b>",
    )
    run_study(raw, tmp_path / "s")
    # A skipped run written by a machine without 4-bit support, as a reader would find it.
    res = json.loads(next((tmp_path / "s" / "runs").glob("full-*/result.json")).read_text())
    res.update(
        status="skipped",
        error="QLoRA needs bitsandbytes 4-bit support: <none here>",
        metrics={},
        test_predictions=None,
    )
    store.atomic_write_json(next((tmp_path / "s" / "runs").glob("full-*/result.json")), res)
    lora_file = next(
        f for f in (tmp_path / "s" / "runs").glob("*/result.json") if '"method": "lora"' in f.read_text()
    )
    lora = json.loads(lora_file.read_text())  # a saved adapter that changed decided predictions
    lora["reload_check"].update(identical_predictions=False, changed_predictions=3)
    store.atomic_write_json(lora_file, lora)
    paths = report.write_report(tmp_path / "s")
    report.print_summary(tmp_path / "s")
    assert f"warning: {lora['run_id']}: its saved adapter does not" in capsys.readouterr().err
    assert "does not reproduce its predictions (3 of" in paths["markdown"].read_text()
    page = paths["html"].read_text()
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>y</b>" not in page
    assert "failed" in page and "skipped" in page and "&lt;none here&gt;" in page
    assert "Segmentation" in page
    assert "http://" not in page and "https://" not in page, "the report must open offline"
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4
    md = paths["markdown"].read_text()
    assert "## Problems: failed runs, and results not to trust" in md and "| method |" in md
    for k in ("accuracy_vs_memory", "accuracy_vs_time", "accuracy_vs_params", "learning_curves"):
        assert paths[k].stat().st_size > 5000


def test_the_reload_check_counts_changed_predictions():
    from peftbench.artefacts import compare_predictions

    logits = np.array([[2.0, -2.0], [0.50, 0.49], [-1.0, 3.0]])
    out = compare_predictions("classification", logits, logits + 1e-4)
    assert out["identical_predictions"] and out["changed_predictions"] == 0 and out["items_checked"] == 3
    out = compare_predictions("classification", logits, logits + np.array([[0, 0], [-0.02, 0], [0, 0]]))
    assert not out["identical_predictions"] and out["changed_predictions"] == 1  # even a near tie
    labels = np.array([[3.0, -0.5], [2.0, -2.0]])  # multi-label: a row with any label changed counts once
    assert compare_predictions("multi_label", labels, -labels)["changed_predictions"] == 2
    scores = np.array([[0.5], [1.5]])
    assert compare_predictions("regression", scores, scores + [[0.1], [1e-5]])["changed_predictions"] == 1


def test_report_for_a_single_method(tiny_encoder, tiny_data, tmp_path):
    # fp32 as asked (`auto` would autocast on a CPU with native bf16)
    train = {"epochs": 1, "precision": "fp32"}
    run_study(study(tiny_encoder, tiny_data, ["lora"], train=train), tmp_path / "s")
    paths = report.write_report(tmp_path / "s")
    md = paths["markdown"].read_text()
    assert "Best accuracy" in md
    # how it ran, with the reasons the speed-ups were off on this CPU
    assert "## How each method ran (its first seed)" in md
    row = "| lora | fp32 | float32 | 16 | off | adamw | fp32: no bf16 autocast | 2d |"
    row += " auto packs on CUDA only | not a CUDA device |"
    assert row in md
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["rows"][0]["label"] == "lora" and summary["rows"][0]["best"]


def test_run_imports_what_its_report_will_while_its_runs_train(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    """`peftbench run` imports the report's dependencies in a background thread once its runs start, when its
    process only waits on them (`report.import_dependencies`); with --no-report it does not. After them,
    writing the report imports none of matplotlib, scipy or scikit-learn: the list is complete."""
    import threading

    from peftbench import cli

    started = []  # (thread, results written by then)
    monkeypatch.setattr(
        report,
        "import_dependencies",
        lambda: started.append(
            (threading.current_thread().name, len(list(tmp_path.glob("*/runs/*/result.json"))))
        ),
    )
    f = tmp_path / "study.json"
    f.write_text(json.dumps(study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1}, report=True)))
    for out, extra in (("quiet", ["--no-report"]), ("s", [])):
        with pytest.raises(SystemExit) as e:
            cli.main(["run", str(f), "--out", str(tmp_path / out), *extra])
        assert e.value.code == 0
        for t in threading.enumerate():
            if t.name == "peftbench-while-training":
                t.join(10)
        assert started == ([("peftbench-while-training", 1)] if not extra else [])  # the quiet one's
    code = (
        "import json, sys; from peftbench import report; report.import_dependencies(); "
        "before = set(sys.modules); report.write_report(sys.argv[1]); "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    late = [m for m in json.loads(done.stdout) if m.split(".")[0] in ("matplotlib", "scipy", "sklearn")]
    assert late == [], f"the report imported these after report.import_dependencies: {late}"


def test_budget_view_on_constructed_histories():
    def run(label, seed, accs, secs):
        hist = [
            {"epoch": i + 1, "validation_accuracy": a, "train_loss": 0.5, "cumulative_train_seconds": s}
            for i, (a, s) in enumerate(zip(accs, secs))
        ]
        return {"label": label, "seed": seed, "status": "success", "history": hist}

    s = {
        "finals": [run("fast", 0, [0.80, 0.85], [1, 2]), run("slow", 0, [0.70, 0.90], [10, 20])],
        "metric": "accuracy",
    }
    header, rows, target = report.budget_table(s)
    assert target == pytest.approx(0.85)  # the lower of the two best validation accuracies
    assert header[-1] == "train s to val acc 0.850"
    assert rows == [["fast", "0.8000", "0.8500", "2.0"], ["slow", "0.7000", "0.9000", "20.0"]]
    assert stats.time_to_reach(s["finals"][0]["history"], "accuracy", 0.99) is None


def test_compare_and_recommend_commands(tiny_encoder, tiny_data, tmp_path, capsys):
    from peftbench import cli

    run_study(
        study(tiny_encoder, tiny_data, ["lora", "ia3"], train={"epochs": 1}, name="one"), tmp_path / "a"
    )
    run_study(
        study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1, "learning_rate": 1e-5}, name="two"),
        tmp_path / "b",
    )
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.md")])
    assert e.value.code == 0
    text, pivot = (tmp_path / "cmp.md").read_text().split("Each study's primary metric by method:")
    assert text.count("| one (") == 2 and text.count("| two (") == 1 and "1.00e-05" in text
    cells = {
        c[0]: c[1:]
        for c in ([x.strip() for x in ln.strip().strip("|").split("|")] for ln in pivot.splitlines())
        if len(c) == 3
    }
    assert all(v[:2] == "0." for v in cells["lora"]) and len(cells["lora"]) == 2  # a figure per study
    assert cells["ia3"][0][:2] == "0." and cells["ia3"][1] == "-"  # ia3 was not in the second study
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["recommend", str(tmp_path / "a"), "--max-memory", "100TB"])
    out = capsys.readouterr().out
    placed = [ln.split(":")[0] for ln in out.splitlines() if not ln.startswith("  note:")]
    assert e.value.code == 0 and sorted(p[3:] for p in placed) == ["ia3", "lora"], out
    assert placed[0][:2] in ("1.", "1=") and all(p[0] in "12" and p[1] in ".=" for p in placed), out
    with pytest.raises(SystemExit) as e:
        cli.main(["recommend", str(tmp_path / "a"), "--max-memory", "1MB"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "No method satisfies" in out and "--max-memory is binding" in out


def test_tensorboard_tracking_writes_per_step_scalars(tiny_encoder, tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (res,) = run_study(
        study(tiny_encoder, tiny_data, ["lora"], tracking="tensorboard", tracking_every=2), tmp_path / "s"
    )
    acc = EventAccumulator(str(tmp_path / "s" / "runs" / res["run_id"] / "tensorboard")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/learning_rate",
        "train/samples_per_second",
        "train/tokens_per_second",
        "validation/accuracy",
    } <= tags
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(2, res["metrics"]["steps"] + 1, 2))
    assert all(e.value > 0 for e in acc.Scalars("train/loss"))
    lrs = [e.value for e in acc.Scalars("train/learning_rate")]
    assert lrs == sorted(lrs, reverse=True)  # linear decay


def test_mlflow_tracking_is_read_back_by_mlflows_own_client(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    from peftbench.tracking import mlflow_uri

    runs = run_study(
        study(tiny_encoder, tiny_data, ["lora", "ia3"], tracking="mlflow", tracking_every=2, name="tracked"),
        tmp_path / "s",
    )
    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "s"))
    exp = client.get_experiment_by_name("tracked")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {r["run_id"] for r in runs}
    for res in runs:
        mr = found[res["run_id"]]
        assert mr.info.status == "FINISHED" and mr.data.params["method"] == res["method"]
        loss = client.get_metric_history(mr.info.run_id, "train/loss")
        assert [m.step for m in loss] == list(range(2, res["metrics"]["steps"] + 1, 2)) and all(
            m.value > 0 for m in loss
        )
        val = client.get_metric_history(mr.info.run_id, "validation/accuracy")
        assert [m.value for m in val] == [h["validation_accuracy"] for h in res["history"]]


def test_statistics_do_not_import_scipy_stats():
    """The statistics need only scipy.special: scipy.stats would add about a second of imports to every
    report."""
    code = (
        "import sys\n"
        "from peftbench import stats\n"
        "stats.mean_ci([0.8, 0.9]); stats.mcnemar([1, 0, 1], [0, 0, 1])\n"
        "print('scipy.special' in sys.modules, 'scipy.stats' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "False"]


def test_gpu_memory_is_the_figure_that_decides_an_oom_and_names_a_card():
    lora = _row("lora", 0.90, 10, 1e6, 18_000)  # allocated 18 GB, but the device held 23 GB
    lora["peak_memory_reserved_mb"] = stats.mean_ci([22_000])
    lora["peak_device_memory_mb"] = stats.mean_ci([23_000])
    old = _row("old", 0.89, 10, 1e6, 30_000)  # a result from before reserved and device were recorded
    s = _study([lora, old])
    assert report.memory_of(lora, True) == 23_000 and report.memory_of(old, True) == 30_000
    header, (row_lora, row_old) = report.table_header(s), report.table_rows(s)
    mem, fits = header.index(report.GPU_MEMORY_LABEL), header.index("fits on (card)")
    assert fits == mem + 1 and len(row_lora) == len(header)
    assert row_lora[mem] == "23,000" and row_lora[fits] == "24 GB" and row_old[fits] == "40 GB"
    assert [r["method"] for r in report.recommend(s, report.parse_memory("22GB"), None, None)["ranked"]] == []
    assert [r["method"] for r in report.recommend(s, report.parse_memory("24GB"), None, None)["ranked"]] == [
        "lora"
    ]


def test_wilson_interval_known_values():
    # the Wilson score interval, as statsmodels' proportion_confint gives it
    low, high = stats.wilson(0.9, 100)
    assert low == pytest.approx(0.8256, abs=1e-4) and high == pytest.approx(0.9448, abs=1e-4)
    assert stats.wilson(1.0, 20)[1] == 1.0 and stats.wilson(0.0, 20)[0] == 0.0


def test_recommendations_say_what_the_data_cannot_rank():
    rows = [_row("full", 0.93, 100, 124.6e6, 1500), _row("lora", 0.929, 90, 1.48e6, 1460)]
    recs = {r["title"]: r for r in report.recommendations(_study(rows, gpu=False))}
    fastest = next(v for k, v in recs.items() if k.startswith("Fastest"))
    assert "not a difference this measurement can rank" in fastest["reason"]
    assert recs["Memory"]["reason"].startswith("not ranked") and not any(
        k.startswith("Best within") for k in recs
    )


def test_report_states_sizes_truncation_and_per_class_results(tiny_encoder, tiny_data, tmp_path):
    run_study(study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 1, "max_length": 12}), tmp_path / "s")
    md = report.write_report(tmp_path / "s")["markdown"].read_text()
    assert "with 120 training, 24 validation and 60 test texts" in md
    assert "training texts (" in md and "were cut at 12 tokens" in md
    assert "## Per class: ia3 (seed 0)" in md and "| class | precision | recall | F1 | support |" in md
    assert "Confusion (rows: true, columns: predicted)" in md
    acc_cell = md.split("| ia3 | ")[1].split(" |")[0]
    assert acc_cell.count("[") == 1  # one seed: its Wilson interval


def test_a_test_split_one_class_dominates_is_named_with_what_a_constant_answer_scores(tmp_path, capsys):
    """Accuracy on a test split that is 80% one class: a constant answer scores 0.800. The run warns at the
    start and the report says so, with the metric to rank by instead; a balanced split, or macro-F1,
    gets no note."""
    import pandas as pd
    from conftest import make_rows

    from peftbench.data import constant_answer

    data = tmp_path / "data"
    data.mkdir()
    make_rows(160, 1, string_labels=True).to_parquet(data / "train.parquet")
    test = make_rows(100, 2, string_labels=True)
    skewed = pd.concat([test[test.label == "pos"], test[test.label == "neg"].head(12)])
    skewed.to_parquet(data / "test.parquet")
    raw = {"model": "unused", "data": {"path": str(data)}, "methods": ["tfidf"], "isolation": "inline"}
    run_study(raw, tmp_path / "s")
    said = "the test split is 81% class pos: answering pos for every text scores 0.806 accuracy"
    assert f"peftbench: warning: {said}" in capsys.readouterr().err
    md = report.write_report(tmp_path / "s")["markdown"].read_text()
    assert f"**Note: {said}; read accuracies against that, or rank by macro_f1" in md
    labels = [0] * 50 + [1] * 50
    assert constant_answer("classification", "accuracy", labels, ["neg", "pos"]) is None
    assert constant_answer("classification", "macro_f1", [1] * 81 + [0] * 19, ["neg", "pos"]) is None


def test_a_tokenizer_missing_words_is_warned_of_at_the_start_and_in_the_report(
    tiny_encoder, tmp_path, capsys
):
    import pandas as pd
    from conftest import write_dataset

    data = write_dataset(tmp_path / "d")
    for split in ("train", "test"):
        df = pd.read_parquet(data / f"{split}.parquet")
        df.assign(text=df.text + " zqx vlorp").to_parquet(data / f"{split}.parquet")  # words it lacks
    run_study(study(tiny_encoder, data, ["head"], train={"epochs": 1}), tmp_path / "s")
    assert "peftbench: warning: model '" in capsys.readouterr().err
    md = report.write_report(tmp_path / "s")["markdown"].read_text()
    assert re.search(
        r"\*\*Note: model '[^']+': its tokenizer maps 1\d% of the training text to the unknown", md
    )


def test_a_study_says_what_it_will_train_before_it_starts(tmp_path):
    """One line before the runs: how many, on how many texts, for how many epochs, where; on a CPU, past
    half an hour at the demo's pace, the hours at that pace and how to make the study quicker."""
    from conftest import write_dataset

    from peftbench import config
    from peftbench.runner import Study

    data = write_dataset(tmp_path / "d", n_train=400, n_test=100)
    raw = {"name": "big", "model": "unused", "data": {"path": str(data)}, "methods": ["tfidf"]}
    few = Study(config.validate({**raw, "seeds": [0, 1]}), tmp_path / "few")
    few.prepare()
    assert few.workload(0) == (
        "big: 2 final runs (tfidf; 2 seed(s)), each training on 360 texts for 3 epoch(s), validating on 40 "
        "and testing on 100, on the CPU"
    )
    many = Study(config.validate({**raw, "seeds": list(range(30)), "train": {"epochs": 20}}), tmp_path / "m")
    many.prepare()
    said = many.workload(5)
    assert said.startswith("big: 5 learning-rate trial runs, then 30 final runs (tfidf; 30 seed(s))"), said
    assert said.endswith(
        "; at 20 texts a second (MiniLM at 128 tokens on 2 CPU cores) that is 3.0 hours of training "
        "(--train-size and --test-size make a quicker study)"
    ), said


def test_verdicts_resample_each_method_once_and_match_each_pair_bootstrapped_alone(monkeypatch):
    """The report's verdicts resample every method once, shared by all its pairs (as many resamplings as
    methods, not pairs), from draws made once per shape, and give the same figures as bootstrapping each
    pair on its own."""
    rng = np.random.default_rng(3)
    correct = {m: _correct(rng, [0.70 + 0.03 * i] * 3, n=300) for i, m in enumerate("abcde")}
    correct["e"] = correct["e"][:2]  # a method with a failed seed: its pairs use the first two seeds
    rows = [_row(m, c.mean(), 1, 1, 1, c) for m, c in correct.items()]
    calls, drawn = [], []
    resample, draws = stats.resample, stats.bootstrap_draws
    monkeypatch.setattr(stats, "resample", lambda *a, **k: calls.append(a[0].shape) or resample(*a, **k))
    monkeypatch.setattr(stats, "bootstrap_draws", lambda *a, **k: drawn.append(a[:2]) or draws(*a, **k))
    got = stats.verdicts(rows, n_boot=600)
    assert len(got) == 10 and len(calls) == 4 + 5, calls  # a-d at 3 seeds, a-e at 2 seeds
    assert sorted(drawn) == [(2, 300), (3, 300)], drawn
    monkeypatch.undo()
    for v in got:
        a, b = correct[v["a"]], correct[v["b"]]
        k = min(len(a), len(b))
        alone = stats.paired_bootstrap(_acc_stats(a[:k]), _acc_stats(b[:k]), "accuracy", 600)
        assert (v["se"], v["p_value"], v["diff"]) == (alone["se"], alone["p_value"], alone["diff"]), v


def test_best_is_resampled_once_for_all_its_pairs_with_the_figures_of_each_pair_alone(monkeypatch):
    """Marking the best over several seeds resamples the best row once and every other row once, from draws
    made once per shape, and gives each row the paired bootstrap it would get on its own."""
    rng = np.random.default_rng(4)
    correct = {m: _correct(rng, [0.70 + 0.03 * i] * 3, n=300) for i, m in enumerate("abcde")}
    correct["a"] = correct["a"][:2]  # a failed seed: its test against the best uses the first two seeds
    rows = [_row(m, c.mean(), 1, 1, 1, c) for m, c in correct.items()]
    calls, drawn = [], []
    resample, draws = stats.resample, stats.bootstrap_draws
    monkeypatch.setattr(stats, "resample", lambda *a, **k: calls.append(a[0].shape) or resample(*a, **k))
    monkeypatch.setattr(stats, "bootstrap_draws", lambda *a, **k: drawn.append(a[:2]) or draws(*a, **k))
    stats.mark_best(rows)
    assert len(calls) == 4 + 2, calls  # e at 3 and at 2 seeds, b-d at 3, a at 2
    assert sorted(drawn) == [(2, 300), (3, 300)], drawn
    monkeypatch.undo()
    assert rows[-1]["best"]
    for r in rows[:-1]:
        k = min(len(correct[r["label"]]), 3)
        alone = stats.paired_bootstrap(_acc_stats(correct["e"][:k]), _acc_stats(correct[r["label"]][:k]))
        assert {x: r["vs_best"][x] for x in alone} == alone, r["label"]


def _correct(rng, accs_per_seed, n=400):
    return np.array([rng.random(n) < a for a in accs_per_seed])


def test_verdicts_clear_tied_unsettled_and_unstable():
    rng = np.random.default_rng(0)
    base = _correct(rng, [0.8, 0.8, 0.8], n=4000)
    clear = _row("clear", 0.95, 1, 1, 1, base | _correct(rng, [0.9, 0.9, 0.9], n=4000))  # ~0.98 every seed
    same = _row("same", 0.80, 1, 1, 1, base.copy())
    same_too = base.copy()
    flip = rng.choice(4000, 6, replace=False)
    same_too[:, flip] = ~same_too[:, flip]  # a handful of 4,000 items differ: a tie, shown
    tied = _row("tied", 0.80, 1, 1, 1, same_too)
    lucky = base.copy()
    wrong = [np.flatnonzero(~base[k]) for k in range(3)]
    right = np.flatnonzero(base[2])
    lucky[0, wrong[0][:60]] = lucky[1, wrong[1][:60]] = True  # two seeds 1.5 points better ...
    lucky[2, wrong[2][:25]], lucky[2, right[:20]] = True, False  # ... the third about even
    unstable = _row("unstable", 0.81, 1, 1, 1, lucky)
    rows = [clear, same, tied, unstable]
    got = {frozenset((v["a"], v["b"])): v for v in stats.verdicts(rows, n_boot=500)}
    v = got[frozenset(("clear", "same"))]
    assert (v["verdict"], v["a"], v["stable"]) == ("better", "clear", True) and v["stability"] > 0.99
    v = got[frozenset(("same", "tied"))]
    assert v["verdict"] == "tied" and v["stable"] and v["stability"] > 0.99
    v = got[frozenset(("unstable", "same"))]
    assert v["verdict"] in ("better", "unsettled") and not v["stable"]
    # at a margin of 5 points the same 1-point lead is shown to be a tie, and a rerun would repeat that
    wide = {frozenset((v["a"], v["b"])): v for v in stats.verdicts(rows, margin=0.05, n_boot=500)}
    assert wide[frozenset(("unstable", "same"))]["verdict"] == "tied"
    assert wide[frozenset(("unstable", "same"))]["stable"]
    one_seed = stats.verdicts([_row("x", 0.9, 1, 1, 1, base[:1] | True), _row("y", 0.8, 1, 1, 1, base[:1])])
    assert one_seed[0]["stability"] is None and one_seed[0]["test"] == "mcnemar"
    assert one_seed[0]["verdict"] == "better" and one_seed[0]["stable"]
    three = _study([clear, same, unstable])
    res = report.recommend(three, None, None, None)
    assert any(n.startswith("unstable over same is unstable: a rerun") for n in res["unsettled"]), res
    # places: only settled verdicts separate methods; an unstable lead shares a place
    assert [(r["method"], r["place"]) for r in res["ranked"]] == [("clear", 1), ("unstable", 2), ("same", 2)]
    assert "share first place" not in report.recommendations(three)[0]["reason"]
    narrow = _study([same, tied])
    narrow["tie_margin"] = 0.001  # 0.1 point: the 0.07-point difference's interval is wider than that
    res = report.recommend(narrow, None, None, None)
    assert len(res["unsettled"]) == 1 and "is unsettled: these results show neither" in res["unsettled"][0]
    assert [r["place"] for r in res["ranked"]] == [1, 1]
    assert "1 other method(s) share first place" in report.recommendations(narrow)[0]["reason"]


def test_a_verdict_is_settled_only_when_a_rerun_would_repeat_it():
    """Two runs of one study: a 1-point lead at p 0.03, and a 0.1-point one at p 0.8, both with a bootstrap
    standard error of 0.47 points (as the fair study on MiniLM gave for full fine-tuning vs LoRA). Neither
    may be reported as a settled verdict: a lead at p 0.03 reruns as a lead about half the time, and the
    0.1-point difference's 90% interval (+-0.77 points) lies only just inside +-1 point, so a rerun shows
    the tie about a quarter of the time."""
    se = 0.0047
    lead = stats.verdict(0.0102, se, 0.031, "accuracy", 0.01)
    assert lead == "better" and stats.replication(lead, 0.0102, se, "accuracy", 0.01) < stats.STABLE
    close = stats.verdict(0.0012, se, 0.80, "accuracy", 0.01)
    assert close == "tied" and stats.replication(close, 0.0012, se, "accuracy", 0.01) < 0.3
    wide = stats.verdict(0.0040, se, 0.40, "accuracy", 0.01)  # +-0.77 around 0.4 points: past +1
    assert wide == "unsettled" and stats.replication(wide, 0.0040, se, "accuracy", 0.01) is None
    assert stats.replication("tied", 0.0012, 0.0015, "accuracy", 0.01) > stats.STABLE  # +-0.25: well inside


def test_a_classifier_that_answers_one_class_for_every_test_item_is_flagged():
    def final(run_id, preds, status="success"):
        return {"run_id": run_id, "status": status, "test_predictions": preds}

    plan = {"data": {"label_names": ["negative", "positive"]}}
    s = {"task": "classification", "plan": plan, "missing": [], "trials": [], "test_labels": [0, 1] * 20}
    s["finals"] = [final("lora-s0", [1] * 40), final("lora-s1", [0, 1] * 20)]
    s["finals"].append(final("ia3-s0", [1] * 40, "oom"))
    problems = report._problems(s)
    assert len(problems) == 2 and problems[0].startswith("ia3-s0: oom")
    assert problems[1].startswith("lora-s0: predicts class positive for all 40 test items")
    assert report.nothing_learned(s) is None  # lora-s1 answers every item right


def test_predictions_no_better_than_guessing_are_flagged_and_a_study_of_them_is_named():
    """Labels that do not follow from the texts (here: shuffled apart from them) leave every method at
    chance with mixed answers, which no one-class check sees: each run's accuracy is tested against what
    random answers in its own answer shares would score, and a study where no run beats that says so."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    learned = np.where(rng.random(400) < 0.8, labels, 1 - labels)  # 80% right
    guessed = rng.permutation(learned)  # the same answer shares, no tie to the labels
    s = {"task": "classification", "plan": {}, "missing": [], "trials": [], "test_labels": labels}
    s["finals"] = [
        {"run_id": f"{m}-s0", "status": "success", "test_predictions": p.tolist()}
        for m, p in (("lora", guessed), ("ia3", rng.permutation(guessed)))
    ]
    problems = report._problems(s)
    assert len(problems) == 2 and all("is no better than guessing" in p for p in problems), problems
    assert "other learning rates" in problems[0]  # 400 items: the model, not the test, is the question
    s["test_labels"] = labels[:100]
    for r in s["finals"]:
        r["test_predictions"] = r["test_predictions"][:100]
    assert "the test split is small (100 items): a larger one" in report._problems(s)[0]
    s["test_labels"] = labels
    for r, p in zip(s["finals"], (guessed, rng.permutation(guessed))):
        r["test_predictions"] = p.tolist()
    assert "(2 of 2 final runs)" in report.nothing_learned(s)
    s["rows"], s["tie_margin"], s["metric"], s["gpu"] = (
        [_row("lora", 0.5, 1, 1e5, 1)],
        0.01,
        "accuracy",
        False,
    )
    assert report.recommendations(s)[0]["reason"].endswith(
        "No run beat guessing, though (see the note above): this ranks noise."
    )
    s["finals"].append({"run_id": "full-s0", "status": "success", "test_predictions": learned.tolist()})
    assert len(report._problems(s)) == 2 and report.nothing_learned(s) is None


def test_test_labels_coded_otherwise_than_training_labels_are_named(tmp_path, capsys):
    """A test file whose 0 and 1 mean the other way round (two sources put together): the model learned,
    so its accuracy falls far below guessing, which names the coding, not the model."""
    import pandas as pd
    from conftest import write_dataset

    data = write_dataset(tmp_path / "d")
    test = pd.read_parquet(data / "test.parquet")
    test.assign(label=1 - test["label"]).to_parquet(data / "test.parquet")
    raw = {"name": "swap", "model": "unused", "data": {"path": str(data)}, "methods": ["tfidf"], "seeds": [0]}
    run_study(raw, tmp_path / "s")
    report.print_summary(tmp_path / "s")  # what `peftbench run` prints after the runs
    err = capsys.readouterr().err
    assert "is far below guessing" in err and "the test labels seem coded otherwise" in err, err
    md = report.write_report(tmp_path / "s")["markdown"].read_text()
    assert "check the test file's label column" in md


def test_against_guessing_for_classes_scores_and_label_sets():
    labels = np.array([0, 1, 2, 0] * 50)
    right = stats.against_guessing("classification", labels, labels)
    assert right["accuracy"] == 1.0 and right["guess"] == pytest.approx(0.5**2 + 2 * 0.25**2)
    assert right["p_value"] < 1e-10
    assert stats.against_guessing("classification", np.zeros(200), labels)["p_value"] == 1.0  # constant
    wrong = stats.against_guessing("classification", (labels + 1) % 3, labels)
    assert wrong["accuracy"] == 0.0 and wrong["p_value"] == 1.0 and wrong["p_below"] < 1e-10
    assert right["p_below"] == 1.0
    scores = np.linspace(0, 5, 100)
    assert stats.against_guessing("regression", scores + 0.1, scores)["p_value"] < 1e-10
    assert stats.against_guessing("regression", np.full(100, 2.5), scores)["p_value"] == 1.0
    assert stats.against_guessing("regression", -scores, scores)["p_below"] < 1e-10
    shuffled = stats.against_guessing("regression", np.random.default_rng(1).permutation(scores), scores)
    assert shuffled["p_value"] > stats.ALPHA
    rows = np.random.default_rng(2).random((300, 4)) < [0.5, 0.3, 0.1, 0.05]  # texts x labels, some sparse
    assert stats.against_guessing("multi_label", rows, rows)["p_value"] < 1e-10
    shuffled = stats.against_guessing("multi_label", np.random.default_rng(3).permutation(rows), rows)
    assert shuffled["p_value"] > 0.01 and abs(shuffled["accuracy"] - shuffled["guess"]) < 0.05
    assert stats.against_guessing("multi_label", np.zeros_like(rows), rows)["p_value"] == 1.0  # constant
    assert stats.against_guessing("multi_label", ~rows, rows)["p_below"] < 1e-10
    assert stats.against_guessing("classification", labels[:10], labels) is None  # other test items


def test_replication_probability_known_values():
    from scipy.special import ndtr

    crit = 1.959964
    # a difference at p = 0.05 (z = 1.96): the rerun's z is N(1.96, 2), a difference again half the time
    assert stats.replication("better", crit, 1.0, "accuracy", 0.01) == pytest.approx(0.5, abs=1e-4)
    assert stats.replication("worse", -3.0, 1.0, "accuracy", 0.01) == stats.replication(
        "better", 3.0, 1.0, "accuracy", 0.01
    )
    assert stats.replication("better", -3.0, 1.0, "mse", 0.01) == pytest.approx(
        stats.replication("better", 3.0, 1.0, "accuracy", 0.01)
    )  # lower error is better
    # a tie at 0 with se 1 and margin 10: the rerun ties while |estimate| < 10 - 1.645, its spread sqrt(2)
    room = 10 - 1.644854
    assert stats.replication("tied", 0.0, 1.0, "accuracy", 10.0) == pytest.approx(
        2 * ndtr(room / 2**0.5) - 1, abs=1e-6
    )
    assert stats.replication("tied", 0.0, 0.0, "accuracy", 0.01) == 1.0  # identical predictions


def test_a_reload_warning_from_a_result_written_before_the_check_counted_its_items():
    from peftbench.artefacts import reload_warning

    old = {"run_id": "full-s1", "artefact": "model", "reload_check": {"identical_predictions": False}}
    assert "model does not reproduce its predictions (reload-check items changed)" in reload_warning(old)
    old["reload_check"] = {"identical_predictions": True, "max_abs_logit_diff": 0.03}
    assert reload_warning(old) is None
