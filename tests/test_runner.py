"""The study runner: result files, rerun-skips, crash isolation, OOM retry, resume, lr search, seeds."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh_python, run_study, study

from peftbench import cli, config, report, runner, store
from peftbench.errors import UserError

REQUIRED_METRICS = [
    "test_accuracy",
    "test_macro_f1",
    "train_seconds",
    "eval_seconds",
    "train_samples_per_second",
    "train_tokens_per_second",
    "trainable_params",
    "total_params",
    "peak_memory_allocated_mb",
    "peak_memory_reserved_mb",
    "peak_host_rss_mb",
    "adapter_size_mb",
]


def test_result_file_has_every_field(tiny_encoder, tiny_data, tmp_path):
    (res,) = run_study(study(tiny_encoder, tiny_data, ["lora"]), tmp_path / "s")
    on_disk = json.loads((tmp_path / "s" / "runs" / res["run_id"] / "result.json").read_text())
    assert on_disk["status"] == "success" and on_disk["error"] is None and on_disk["method"] == "lora"
    for key in REQUIRED_METRICS:
        assert key in on_disk["metrics"], key
    assert on_disk["metrics"]["peak_memory_allocated_mb"] is None  # CPU run: no GPU memory to report
    assert on_disk["metrics"]["cuda_graphs"] == "not a CUDA device"
    assert on_disk["metrics"]["peak_host_rss_mb"] > 50
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2]
    assert all(0 <= h["validation_accuracy"] <= 1 and h["train_loss"] > 0 for h in on_disk["history"])
    assert all(0 < h["validation_loss"] < 5 for h in on_disk["history"])  # cross entropy of 2 classes
    assert (
        on_disk["splits"]["test_accuracy"] == "test"
        and on_disk["splits"]["validation_accuracy"] == "validation"
    )
    assert on_disk["config_hash"] == on_disk["config"]["config_hash"] and len(on_disk["config_hash"]) == 16
    assert on_disk["config"]["train"]["learning_rate"] == 5e-4
    assert on_disk["environment"]["packages"]["peft"] and on_disk["environment"]["packages"]["torch"]
    assert len(on_disk["test_predictions"]) == 60
    assert not list((tmp_path / "s").rglob("*.tmp")), "a temporary file was left behind"


def test_rerun_skips_done_runs_and_redoes_changed_ones(tiny_encoder, tiny_data, tmp_path, capsys):
    raw = study(tiny_encoder, tiny_data, ["lora", "ia3"])
    first = run_study(raw, tmp_path / "s")
    again = run_study({**raw, "tie_margin": 0.05}, tmp_path / "s")  # a report setting: nothing retrains
    assert [r["started_at"] for r in first] == [r["started_at"] for r in again]
    assert "2 of 2 study runs already done" in capsys.readouterr().err
    assert report.load_study(tmp_path / "s")["tie_margin"] == 0.05
    with pytest.raises(SystemExit) as done:  # one report at another margin
        cli.main(["report", str(tmp_path / "s"), "--tie-margin", "0.5"])
    assert done.value.code == 0
    assert {v["margin"] for v in json.loads((tmp_path / "s" / "summary.json").read_text())["verdicts"]} == {
        0.5
    }
    assert "within ±50 points (--tie-margin)" in (tmp_path / "s" / "report" / "report.md").read_text()
    changed = run_study(
        {**raw, "methods": ["lora", {"name": "ia3", "label": "ia3", "epochs": 1}]}, tmp_path / "s"
    )
    err = capsys.readouterr().err
    assert "1 of 2 study runs already done" in err and "1 study run(s) hold results made under other" in err
    assert changed[0]["started_at"] == first[0]["started_at"]
    assert changed[1]["started_at"] > first[1]["started_at"] and len(changed[1]["history"]) == 1
    (kept,) = (tmp_path / "s").glob("archive-*/runs/*/result.json")  # the replaced result, as it was
    assert kept.parent.name == first[1]["run_id"] and json.loads(kept.read_text()) == first[1]
    assert f"their earlier results move to {kept.parents[2]}" in err.replace("\n", "")
    assert len(report.load_study(tmp_path / "s")["finals"]) == 2  # the archive is not read as a run


def test_same_seed_gives_identical_metrics(tiny_encoder, tiny_data, tmp_path):
    a = run_study(study(tiny_encoder, tiny_data, ["full", "lora"]), tmp_path / "a")
    b = run_study(study(tiny_encoder, tiny_data, ["full", "lora"]), tmp_path / "b")
    for x, y in zip(a, b):
        assert x["metrics"]["test_accuracy"] == y["metrics"]["test_accuracy"]
        assert [h["train_loss"] for h in x["history"]] == [h["train_loss"] for h in y["history"]]
        assert x["test_predictions"] == y["test_predictions"]


def test_seeds_change_training_not_the_test_items(tiny_encoder, tiny_data, tmp_path):
    res = run_study(study(tiny_encoder, tiny_data, ["lora"], seeds=2), tmp_path / "s")
    assert [r["seed"] for r in res] == [0, 1]
    assert res[0]["config"]["data_fingerprint"] == res[1]["config"]["data_fingerprint"]
    assert res[0]["history"][0]["train_loss"] != res[1]["history"][0]["train_loss"]


def test_study_json_says_where_the_start_went(tiny_encoder, tiny_data, tmp_path):
    """Each step of the preparation is timed, and the runs start after it; a rerun, whose tokens come from
    the study's cache, times the same steps."""
    raw = study(tiny_encoder, tiny_data, ["lora"])
    res = run_study(raw, tmp_path / "s")
    plan = json.loads((tmp_path / "s" / "study.json").read_text())
    steps = plan["prepare_seconds"]
    assert list(steps) == ["data", "device", "model_config", "tokenizer", "tokenize"]
    assert all(0 <= v for v in steps.values()) and sum(steps.values()) <= plan["wall_seconds"]
    assert all(r["started_at"] >= plan["prepared_at"] for r in res)
    run_study(raw, tmp_path / "s")
    again = json.loads((tmp_path / "s" / "study.json").read_text())
    assert list(again["prepare_seconds"]) == list(steps) and again["prepared_at"] > plan["prepared_at"]


def test_lr_grid():
    grid = runner.lr_grid(1e-3, 5, 1.5)
    assert len(grid) == 5 and grid[2] == pytest.approx(1e-3)
    assert grid[0] == pytest.approx(10**-3.75, rel=1e-2) and grid[-1] == pytest.approx(10**-2.25, rel=1e-2)
    assert grid == sorted(grid)


def test_lr_search_selects_on_validation_and_scores_test_once(tiny_encoder, tiny_data, tmp_path):
    raw = study(
        tiny_encoder, tiny_data, ["lora"], lr_search={"points": 3, "decades": 2}, seeds=2, train={"epochs": 1}
    )
    res = run_study(raw, tmp_path / "s")
    trials = [r for r in res if r["role"] == "trial"]
    finals = [r for r in res if r["role"] == "final"]
    assert len(trials) == 3 and len(finals) == 2
    assert all("test_accuracy" not in r["metrics"] and r["test_predictions"] is None for r in trials)
    # a trial keeps no model (nothing reads it); a final keeps its adapter
    runs = tmp_path / "s" / "runs"
    assert all(r["artefact"] is None and not (runs / r["run_id"] / "adapter").exists() for r in trials)
    assert all(r["artefact"] == "adapter" and (runs / r["run_id"] / "adapter").is_dir() for r in finals)
    best = max(trials, key=lambda r: (r["metrics"]["validation_accuracy"], -r["learning_rate"]))
    assert {r["learning_rate"] for r in finals} == {best["learning_rate"]}
    plan = json.loads((tmp_path / "s" / "study.json").read_text())
    assert plan["chosen_learning_rates"] == {"lora": best["learning_rate"]}
    from peftbench import report

    (choice,) = report.lr_choice(report.load_study(tmp_path / "s"))
    others = [r["metrics"]["validation_accuracy"] for r in trials if r is not best]
    assert choice["gap_points"] == pytest.approx(100 * (best["metrics"]["validation_accuracy"] - max(others)))
    assert choice["gap_items"] == round(choice["gap_points"] / 100 * 24)  # 24 validation items
    assert "above the runner-up" in report.write_report(tmp_path / "s")["markdown"].read_text()


def test_halving_schedule_on_a_fake_objective(tmp_path):
    """Synchronous successive halving: every rate runs the grace epoch, the best half (ties: the lower rate)
    go on to twice the epochs, and so on; pruned rates never run past their rung."""
    from peftbench import config
    from peftbench.runner import Study
    from peftbench.spec import Runtime, RunSpec, TrainSettings

    raw = {
        "model": "x",
        "data": {"path": str(tmp_path)},
        "methods": ["lora"],
        "seeds": [0, 1],
        "train": {"epochs": 5},
        "lr_search": {"points": 5, "seeds": 2, "schedule": "halving", "reduction_factor": 2},
    }
    st = Study(config.validate(raw), tmp_path / "s")
    lrs = [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]
    # 4e-4 leads after 1 epoch, 3e-4 ties 2e-4 there (the lower, 2e-4, goes on), 3e-4 wins at 2 epochs
    # only if it was kept, which it is not: the kept pair is 4e-4 and 2e-4.
    at = {1: {1e-4: 0.50, 2e-4: 0.60, 3e-4: 0.60, 4e-4: 0.70, 5e-4: 0.40}, 2: {2e-4: 0.80, 4e-4: 0.75}}
    ran = []

    def fake_execute(specs, desc):
        out = []
        for s in specs:
            stop = s.runtime.stop_after_epoch
            ran.append((s.learning_rate, s.seed, stop))
            # seeds differ; their mean is `at`
            hist = [
                {"epoch": e, "validation_accuracy": at[e][s.learning_rate] + (0.01 if s.seed else -0.01)}
                for e in range(1, stop + 1)
            ]
            out.append(
                {
                    "run_id": s.runtime.run_id,
                    "label": s.label,
                    "learning_rate": s.learning_rate,
                    "status": "paused",
                    "history": hist,
                    "metrics": {"validation_accuracy": hist[-1]["validation_accuracy"], "epochs_done": stop},
                }
            )
        return out

    st.execute = fake_execute
    trials = [
        RunSpec(
            study="t",
            model="x",
            model_path="x",
            method="lora",
            label="lora",
            method_options={},
            train=TrainSettings(epochs=5),
            seed=seed,
            learning_rate=lr,
            role="trial",
            evaluate_test=False,
            data={},
            runtime=Runtime(run_id=f"lora-{lr}-{seed}"),
        ).planned()
        for lr in lrs
        for seed in (0, 1)
    ]
    results, chosen, rungs = st.halving(trials)
    assert chosen == {"lora": 2e-4}
    planned = runner.halving_rungs(st.cfg["lr_search"], 5)
    assert [(r["epochs"], len(r["kept"])) for r in rungs["lora"]] == planned
    assert [r["epochs"] for r in rungs["lora"]] == [1, 2]
    assert rungs["lora"][0]["kept"] == [4e-4, 2e-4] and rungs["lora"][1]["kept"] == [2e-4]
    assert sorted({lr for lr, _, stop in ran if stop == 2}) == [2e-4, 4e-4]
    assert len(ran) == 10 + 4 and len(results) == 10


def test_halving_rungs_and_the_span_of_a_trials_schedule():
    """The rungs a halving search runs, and so the epochs its trials' learning-rate schedule spans: the
    deciding rung's, capped at the study's epochs."""

    def rungs(points, rf, grace, epochs):
        return runner.halving_rungs({"points": points, "reduction_factor": rf, "grace_epochs": grace}, epochs)

    assert rungs(5, 2, 1, 5) == [(1, 2), (2, 1)]  # the fair preset: trials span 2 epochs
    assert rungs(16, 2, 1, 5) == [(1, 8), (2, 4), (4, 2), (5, 1)]
    assert rungs(9, 3, 1, 5) == [(1, 3), (3, 1)]
    assert rungs(5, 3, 1, 5) == [(1, 1)]  # one rung decides: a 1-epoch schedule
    assert rungs(4, 2, 3, 2) == [(2, 1)]  # grace past the epochs: one rung at the last epoch


def test_the_grid_estimate_leaves_out_the_graph_start_up_a_process_pays_once():
    """A halving trial's seconds, extended to the grid's epochs: its steady epochs scale, the CUDA graphs'
    start-up (paid by each process, so twice by a resumed trial) is counted once; a diverged trial counts
    as it ran. Scaling the seconds by epochs instead would give 11.7 s / 4 x 15 = 43.9 s."""
    from peftbench import report

    def trial(status, train, val, warm):
        history = [{"epoch": e + 1, "graph_start_seconds": w} for e, w in enumerate(warm)]
        config = {"train": {"epochs": 5}}
        metrics = {"train_seconds": train, "validation_seconds": val}
        return {"status": status, "history": history, "metrics": metrics, "config": config}

    stopped = trial("paused", 3.0, 0.5, [2.0])  # 1 s of training, 0.5 of validation, 2 s start-up
    resumed = trial("paused", 6.0, 1.0, [2.0, 2.0])  # its second epoch in a new process
    diverged = trial("diverged", 1.0, 0.2, [2.0])
    est = runner._grid_estimate([stopped, resumed, diverged], 5)
    # validation extended at each trial's seconds per epoch, or not extended
    assert est["grid_run_seconds"] == pytest.approx((2.0 + 5 * 1.5) * 2 + 1.2)
    assert est["grid_run_seconds_low"] == pytest.approx((2.0 + 5 * 1.0 + 0.5) + (2.0 + 5 * 1.0 + 1.0) + 1.2)
    assert est["graph_start_seconds"] == pytest.approx(6.0)
    del resumed["history"][1]["graph_start_seconds"]  # a result written before the start-up was recorded
    assert runner._grid_estimate([stopped, resumed], 5) == {}

    record = {"schedule": "halving", "rungs": [], "run_seconds": 10.5, "epochs_run": 3, "grid_epochs": 10}
    study_ = {"plan": {"lr_search": {"new": {**record, **est}, "old": {**record, "grid_run_seconds": 40.0}}}}
    (_, new), (_, old) = report.search_cost(study_)
    assert "6 s of it starting CUDA graphs; 1.6-1.9x less than the full grid's estimated 17-20 s" in new
    assert "estimated" not in old  # a record without the start-up time: no estimate shown
    assert "schedule" not in new  # nor, without it, the span of the trials' schedule
    study_["plan"]["lr_search"]["new"]["trial_epochs"] = 2
    assert (
        ", each trial's learning-rate schedule over 2 epoch(s)); 3 of the grid's 10"
        in (report.search_cost(study_)[0][1])
    )
    study_["plan"]["lr_search_wall_seconds"] = 30.4
    assert report.search_cost(study_)[-1] == (
        None,
        "The search took 30 s from its first trial to its choice (all methods).",
    )
    study_["trials"] = [{"config": {"concurrent_runs": 1}}]  # one run at a time: each run's seconds its own
    assert not any("at a time" in text for _, text in report.search_cost(study_))
    study_["trials"].append({"config": {"concurrent_runs": 4}})  # --parallel 4: the trials' seconds overlap
    assert report.search_cost(study_)[-1][1].startswith("Trials went 4 at a time")


def test_a_halving_search_resumes_and_skips_what_is_done(
    tiny_encoder, tiny_data, tmp_path, capfd, monkeypatch
):
    """A real halving search on a tiny model: trials pause at their rung, the chosen rate's final runs, the
    search recorded in study.json; run again, every trial is skipped and nothing is retrained."""
    import json

    from peftbench import train

    saved, save = [], train.save_checkpoint

    def counted(path, state):
        saved.append((path.parent.name.split("-")[1], state["epoch"] + 1))
        save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", counted)

    raw = study(
        tiny_encoder,
        tiny_data,
        ["lora"],
        train={"epochs": 4},
        lr_search={"points": 4, "decades": 1, "schedule": "halving", "reduction_factor": 2},
    )
    out = tmp_path / "s"
    results = run_study(raw, out)
    trials = [r for r in results if r["role"] == "trial"]
    # the trials' learning-rate schedule spans the deciding rung's 2 epochs, the finals' all 4: the pruned
    # rates pause after 1, the kept ones end their schedule at 2
    assert {r["config"]["train"]["epochs"] for r in trials} == {2}
    ended = sorted((r["status"], len(r["history"])) for r in trials)
    assert ended == [("paused", 1)] * 2 + [("success", 2)] * 2
    search = json.loads((out / "study.json").read_text())["lr_search"]["lora"]
    assert search["epochs_run"] == 6 and search["grid_epochs"] == 16 and search["trial_epochs"] == 2
    # on the CPU no graphs start: the grid's estimate is the trials' seconds per epoch, at 16 epochs
    assert search["graph_start_seconds"] == 0 and search["grid_run_seconds"] > search["run_seconds"]
    assert [len(r["rates"]) for r in search["rungs"]] == [4, 2]
    assert not list((out / "runs").glob("*/checkpoint.pt"))  # decided: no trial keeps its checkpoint
    # trials checkpoint at rung 1's pause (rung 2 ends their schedule); the final's seconds-long epochs write
    # none (checkpoint_every_seconds)
    assert saved == [("trial", 1)] * 4
    final = next(r for r in results if r["role"] == "final")
    assert final["status"] == "success" and final["learning_rate"] == search["rungs"][-1]["kept"][0]
    assert final["config"]["train"]["epochs"] == 4 and len(final["history"]) == 4
    before = {r["run_id"]: r["started_at"] for r in trials}
    capfd.readouterr()
    again = run_study(raw, out)
    assert {r["run_id"]: r["started_at"] for r in again if r["role"] == "trial"} == before
    # the rerun finds the kept rates' results at 2 epochs; rung 1 still compares them at 1
    assert json.loads((out / "study.json").read_text())["lr_search"]["lora"]["rungs"] == search["rungs"]
    err = capfd.readouterr().err
    assert "4 of 4 lr search, rung 1 runs already done" in err and "2 of 2 lr search, rung 2" in err


def test_select_learning_rates_on_constructed_results():
    def mk(lr, acc, status="success"):
        return {"label": "m", "learning_rate": lr, "status": status, "metrics": {"validation_accuracy": acc}}

    assert runner.select_learning_rates([mk(1e-4, 0.7), mk(1e-3, 0.9), mk(1e-2, 0.95, "failed")]) == {
        "m": 1e-3
    }
    assert runner.select_learning_rates([mk(1e-4, 0.9), mk(1e-3, 0.9)]) == {"m": 1e-4}
    # Several trial seeds: the mean decides (1e-3 wins one seed by luck, 1e-4 wins on average); a rate with a
    # failed seed is not chosen.
    seeds = [
        mk(1e-3, 0.95),
        mk(1e-3, 0.80),
        mk(1e-4, 0.90),
        mk(1e-4, 0.89),
        mk(1e-2, 0.99),
        mk(1e-2, 0, "oom"),
    ]
    assert runner.select_learning_rates(seeds) == {"m": 1e-4}


def test_lr_search_over_several_seeds_runs_each_rate_at_each(tiny_encoder, tiny_data, tmp_path):
    raw = study(
        tiny_encoder,
        tiny_data,
        ["ia3"],
        lr_search={"points": 2, "decades": 1, "seeds": 2},
        seeds=[5],
        train={"epochs": 1},
    )
    res = run_study(raw, tmp_path / "s")
    trials = [r for r in res if r["role"] == "trial"]
    assert sorted((r["learning_rate"], r["seed"]) for r in trials) == sorted(
        (lr, s) for lr in {r["learning_rate"] for r in trials} for s in (5, 6)
    )
    mean = {
        lr: sum(r["metrics"]["validation_accuracy"] for r in trials if r["learning_rate"] == lr) / 2
        for lr in {r["learning_rate"] for r in trials}
    }
    final = next(r for r in res if r["role"] == "final")
    assert final["learning_rate"] == max(mean, key=lambda lr: (mean[lr], -lr))


def test_crash_in_one_run_is_recorded_and_the_study_goes_on(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "ia3:segv")
    res = run_study(
        study(tiny_encoder, tiny_data, ["ia3", "lora"], isolation="process", train={"epochs": 1}),
        tmp_path / "s",
    )
    assert res[0]["status"] == "failed" and "signal" in res[0]["error"] and "Segmentation" in res[0]["error"]
    assert res[1]["status"] == "success"
    monkeypatch.delenv("PEFTBENCH_INJECT_FAULT")
    again = run_study(
        study(tiny_encoder, tiny_data, ["ia3", "lora"], isolation="process", train={"epochs": 1}),
        tmp_path / "s",
    )
    assert again[0]["status"] == "success" and again[1]["started_at"] == res[1]["started_at"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_warm_trials_train_as_fresh_ones_do(method, tiny_encoder, tiny_data, tmp_path):
    """Trials that take over the model the last trial left (warm_trials) train exactly as trials set up from
    scratch: each seed's initial weights, its random state (dropout), a new optimizer."""
    lr_search = {"points": 2, "decades": 1, "seeds": 2}
    raw = study(tiny_encoder, tiny_data, [method], lr_search=lr_search, train={"epochs": 2})
    runs, finals = {}, {}
    for warm in (True, False):
        res = run_study({**raw, "warm_trials": warm}, tmp_path / str(warm))
        runs[warm] = [r for r in res if r["role"] == "trial"]
        (finals[warm],) = [r for r in res if r["role"] == "final"]
    assert [r["metrics"]["warm_start"] for r in runs[True]] == [False, True, True, True]
    assert not any(r["metrics"]["warm_start"] for r in runs[False])
    for a, b in zip(runs[True], runs[False]):
        assert a["run_id"] == b["run_id"]
        assert [(h["train_loss"], h["validation_accuracy"]) for h in a["history"]] == [
            (h["train_loss"], h["validation_accuracy"]) for h in b["history"]
        ]
    # a final run never takes a trial's model over: it trains as in a study without warm trials
    assert finals[True]["metrics"]["warm_start"] is False
    assert [h["train_loss"] for h in finals[True]["history"]] == [
        h["train_loss"] for h in finals[False]["history"]
    ]


def test_warm_trials_share_a_process_and_a_crash_costs_only_its_run(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    from peftbench import methods

    lrs = runner.lr_grid(methods.get("lora").learning_rate, 2, 1)
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", f"lr{lrs[0]:.2e}-s1:segv")
    raw = study(
        tiny_encoder,
        tiny_data,
        ["lora"],
        isolation="process",
        lr_search={"points": 2, "decades": 1, "seeds": 3},
        train={"epochs": 1},
    )
    s = runner.Study(config.validate(raw), tmp_path / "plan")
    s.out.mkdir()
    s.prepare()
    trials = s.trial_specs()
    key = trials[0].warm_key()
    assert [(k, len(c)) for k, c in s.chains(trials, 1)] == [(f"{key}-0", 6)]
    assert [(k, len(c)) for k, c in s.chains(trials, 2)] == [(f"{key}-0", 3), (f"{key}-1", 3)]
    assert [k for k, _ in s.chains([t.with_runtime(warm=False) for t in trials], 1)] == [None] * 6
    res = [r for r in run_study(raw, tmp_path / "s") if r["role"] == "trial"]
    status = {r["run_id"].split("trial-")[1]: r["status"] for r in res}
    crashed = f"lr{lrs[0]:.2e}-s1"
    assert status.pop(crashed) == "failed" and set(status.values()) == {"success"}
    assert "Segmentation" in next(r["error"] for r in res if crashed in r["run_id"])
    # one process ran the first two trials and died in the second; a new one ran the other four
    assert [r["metrics"].get("warm_start") for r in res] == [False, None, False, True, True, True]


def test_a_warm_worker_runs_each_run_with_the_thread_share_of_its_rung(monkeypatch):
    """The runs at once change from rung to rung, and with them each run's share of the CPU's cores: a warm
    worker is told the share with each run, None for torch's own count, and records what the run had."""
    import threading
    from types import SimpleNamespace

    import torch

    from peftbench import worker

    sent = []

    class Worker:
        def __init__(self, progress, extra_env):
            pass

        def run(self, rdir, cuda, threads=None):
            sent.append(threads)
            return 0

    monkeypatch.setattr(runner, "WarmWorker", Worker)
    monkeypatch.setattr(runner, "collect", lambda spec, rdir, code, launched: code)
    me = SimpleNamespace(warm_workers={}, stopping=threading.Event(), _prepare_run_dir=lambda spec: Path("r"))
    cpu = [SimpleNamespace(runtime=SimpleNamespace(device="cpu"))] * 2
    runner.Study._execute_chain(me, "a", cpu, False, lambda r: r, {"OMP_NUM_THREADS": "3"})
    runner.Study._execute_chain(me, "a", cpu[:1], False, lambda r: r, {})
    assert sent == [3, 3, None]

    ran = []

    class Conn:
        messages = [("/runs/a", 1), ("/runs/b", None), ("/runs/c", 2), None]

        def recv(self):
            return self.messages.pop(0)

        def send(self, answer):
            ran.append(answer)

    monkeypatch.setattr(worker, "die_with_parent", lambda: None)
    monkeypatch.setattr(worker, "_quiet", lambda: None)
    monkeypatch.setattr(worker, "_execute_logged", lambda rdir, rank: ran.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        worker.serve(Conn(), default_threads=3)
    finally:
        torch.set_num_threads(before)
    assert ran == [1, "/runs/a", 3, "/runs/b", 2, "/runs/c"]


def test_a_warm_worker_that_died_between_runs_is_replaced(tiny_encoder, tiny_data, tmp_path):
    import signal

    raw = study(tiny_encoder, tiny_data, ["lora"], isolation="process", lr_search={"points": 2, "decades": 1})
    s = runner.Study(config.validate(raw), tmp_path / "s")
    s.out.mkdir()
    s.prepare()
    first, second = (s._prepare_run_dir(t) for t in s.trial_specs())
    worker = runner.WarmWorker(False)
    try:
        assert worker.run(first, False) == 0
        os.kill(worker.proc.pid, signal.SIGKILL)  # e.g. the host's OOM killer, while the worker waits
        worker.proc.join()
        assert worker.run(second, False) == 0
        assert store.read_result(second / "result.json")["status"] == "success"
    finally:
        worker.close()


def test_a_warm_worker_waiting_between_runs_ends_quietly_on_ctrl_c(tiny_encoder, tiny_data, tmp_path):
    """Ctrl-C reaches every worker of the process group, an idle warm worker too: it exits with 130 and no
    traceback (the CLI prints the one line). In a fresh process with Ctrl-C's default handling, as a user's
    terminal gives it: a pytest worker may ignore SIGINT, and the forkserver's workers inherit that."""
    import signal
    import subprocess

    code = (
        "import json, os, signal, sys\n"
        "from pathlib import Path\n"
        "from peftbench import config, runner\n"
        "s = runner.Study(config.validate(json.loads(sys.argv[1])), Path(sys.argv[2]))\n"
        "s.out.mkdir()\n"
        "s.prepare()\n"
        "worker = runner.WarmWorker(False)\n"
        "assert worker.run(s._prepare_run_dir(s.trial_specs()[0]), False) == 0\n"  # then it waits
        "os.kill(worker.proc.pid, signal.SIGINT)\n"
        "worker.proc.join(60)\n"
        "print('exit', worker.proc.exitcode)\n"
    )
    raw = study(tiny_encoder, tiny_data, ["lora"], isolation="process", lr_search={"points": 2, "decades": 1})
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(raw), str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.split()[-2:] == ["exit", "130"], proc.stdout[-500:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_warm_worker_interrupted_while_it_starts_closes_cleanly(tmp_path, monkeypatch):
    """Ctrl-C while a warm worker's process starts: closing the workers must not fail on the process that
    never started (it did, with "can only join a started process", over the interrupt's own message)."""
    from multiprocessing.process import BaseProcess

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(BaseProcess, "start", interrupted)
    worker = runner.WarmWorker(False)
    with pytest.raises(KeyboardInterrupt):
        worker.run(tmp_path, False)
    worker.close()
    assert worker.proc is None and worker.conn is None


def test_an_interrupted_search_stops_its_warm_workers_instead_of_waiting(tmp_path):
    """The search closes its warm workers on the way out; interrupted, it must not wait for a worker's run in
    progress (minutes on a GPU) to end before the CLI can stop."""
    events = []

    class Busy:  # a worker process in the middle of a run: join() returns only once it is killed
        pid = 1

        def kill(self):
            events.append("kill")

        def join(self):
            assert "kill" in events, "joined a busy worker without stopping it"
            events.append("join")

    class Pipe:
        def send(self, msg):
            raise BrokenPipeError  # a killed worker's pipe: an OSError

    s = runner.Study.__new__(runner.Study)
    s.warm_workers = {"lora": runner.WarmWorker(False)}
    s.warm_workers["lora"].proc, s.warm_workers["lora"].conn = Busy(), Pipe()
    s.cfg = {"lr_search": {"schedule": "grid"}}

    def interrupted(specs, desc):
        raise KeyboardInterrupt

    s.execute = interrupted
    with pytest.raises(KeyboardInterrupt):
        s.search([])
    assert events == ["kill", "join"] and not s.warm_workers


def test_an_interrupt_starts_no_further_run_and_returns_at_once():
    """Ctrl-C with runs going several at a time: the queued ones must not start, and the running ones must
    start no further run (each would be a new process the CLI then waits for: minutes on a GPU)."""
    import threading

    s = runner.Study.__new__(runner.Study)
    s.stopping = threading.Event()
    started = []

    def chain(i):
        if s.stopping.is_set():  # as the study's chains check before each run
            return []
        started.append(i)
        if i == 0:
            time.sleep(0.2)
            raise KeyboardInterrupt
        s.stopping.wait(10)  # a run in progress, until the CLI kills it
        return []

    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        s._in_threads(chain, list(range(8)), 2)
    assert s.stopping.is_set() and time.time() - t0 < 5
    time.sleep(0.3)
    assert started[:2] in ([0, 1], [1, 0]) and len(started) <= 3, started  # at most one in the race


def test_a_halving_rung_goes_on_in_the_process_that_ran_the_last(tiny_encoder, tiny_data, tmp_path):
    raw = study(
        tiny_encoder,
        tiny_data,
        ["lora"],
        isolation="process",
        lr_search={"points": 4, "decades": 1, "schedule": "halving"},
        train={"epochs": 2},
    )
    trials = [r for r in run_study(raw, tmp_path / "s") if r["role"] == "trial"]
    resumed = [r for r in trials if len(r["history"]) == 2]
    assert len(resumed) == 2 and all(r["metrics"]["resumed_from_epoch"] == 1 for r in resumed)
    assert all(r["metrics"]["warm_start"] for r in resumed)  # no process started for rung 2


def test_oom_retries_with_smaller_micro_batches(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "lora:oom_above=4")
    (res,) = run_study(study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1}), tmp_path / "s")
    assert res["status"] == "success"
    assert [a["micro_batch_size"] for a in res["attempts"]] == [16, 8, 4]
    assert res["attempts"][-1]["outcome"] == "success"
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "lora:oom_above=1")
    (res,) = run_study(
        study(tiny_encoder, tiny_data, ["lora"], max_oom_retries=2, train={"epochs": 1}), tmp_path / "t"
    )
    assert res["status"] == "oom" and "out of memory" in res["error"]
    assert [a["micro_batch_size"] for a in res["attempts"]] == [16, 8, 4]


def test_accumulation_keeps_the_optimisation(tiny_encoder, tiny_data, tmp_path):
    """Half the micro-batch and twice the accumulation: the same effective batch and nearly the same run."""
    (a,) = run_study(study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1}), tmp_path / "a")
    (b,) = run_study(
        study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1, "micro_batch_size": 4}), tmp_path / "b"
    )
    assert b["metrics"]["micro_batch_size"] == 4 and a["metrics"]["steps"] == b["metrics"]["steps"]
    assert abs(a["history"][0]["train_loss"] - b["history"][0]["train_loss"]) < 2e-3


def test_run_that_dies_after_writing_its_result_keeps_it(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    """A worker that exits non-zero while shutting down, after its result and artefact were written (seen once
    on the CPU machine: status 255), keeps what it measured; the exit status is recorded beside it."""
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "ia3:exit_at_end")
    ia3, lora = run_study(
        study(tiny_encoder, tiny_data, ["ia3", "lora"], isolation="process", train={"epochs": 1}),
        tmp_path / "s",
    )
    assert (
        ia3["status"] == "success"
        and ia3["worker_exit_status"] == 255
        and ia3["metrics"]["test_accuracy"] >= 0
    )
    on_disk = json.loads((tmp_path / "s" / "runs" / ia3["run_id"] / "result.json").read_text())
    assert on_disk["status"] == "success" and on_disk["worker_exit_status"] == 255
    assert lora["status"] == "success" and "worker_exit_status" not in lora


@pytest.mark.parametrize("every, written", [(0, [1, 2]), (3600, [])])
def test_epoch_checkpoints_wait_for_checkpoint_every_seconds_of_training(
    tiny_encoder, tiny_data, tmp_path, monkeypatch, every, written
):
    """0: a checkpoint after every epoch but the last; an hour: none in a run of seconds."""
    from peftbench import train

    saved, save = [], train.save_checkpoint
    monkeypatch.setattr(
        train, "save_checkpoint", lambda path, state: (saved.append(state["epoch"] + 1), save(path, state))
    )
    raw = study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 3}, checkpoint_every_seconds=every)
    (res,) = run_study(raw, tmp_path / "s")
    assert res["status"] == "success" and saved == written


def test_a_profiled_run_writes_where_its_steps_time_goes(tiny_encoder, tiny_data, tmp_path):
    """`profile: true`: RUN_DIR/profile.json with the step's wall time, its busiest host operators, and its
    GPU kernel time split by kind (none on the CPU)."""
    from peftbench.tracking import KERNEL_KINDS

    (res,) = run_study(study(tiny_encoder, tiny_data, ["lora"], profile=True), tmp_path / "s")
    (path,) = (tmp_path / "s").rglob("profile.json")
    prof = json.loads(path.read_text())
    assert res["status"] == "success" and prof["steps"] >= 1 and prof["wall_ms_per_step"] > 0
    assert any(r["op"].startswith("aten::") for r in prof["top_host"])
    by_kind = prof["gpu_kernel_ms_per_step_by_kind"]
    assert set(by_kind) <= {kind for kind, _ in KERNEL_KINDS} | {"other"}
    assert sum(by_kind.values()) == pytest.approx(prof["gpu_kernel_ms_per_step"])


@pytest.mark.parametrize(
    "name, kind",
    [  # kernels of the H100 profiles and traces in benchmarks/results, names shortened
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64", "attention"),
        ("void cudnn::fusion::compute_dot_do_o<true>", "attention"),
        ("nvjet_sm90_tst_96x64_64x8_2x4_h_bz_NTN", "matrix products"),
        ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "matrix products"),
        ("multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMath>", "optimizer step"),
        ("multi_tensor_apply_kernel<TensorListMetadata<1>, LpNormFunctor<float>>", "gradient norm"),
        ("triton_per_fused__to_copy_add_native_layer_norm_1", "normalization"),
        ("triton_red_fused_native_dropout_backward_sum_view_3", "dropout"),
        ("triton_poi_fused_gelu_gelu_backward_view_5", "activation"),
        ("multi_tensor_apply_kernel<TensorListMetadata<2>, CopyFunctor>", "multi-tensor copies and adds"),
        ("vectorized_elementwise_kernel<8, bfloat16_copy_kernel_cuda>", "copies and casts"),
        ("cub::detail::radix_sort::DeviceRadixSortOnesweepKernel", "embeddings"),
        ("reduce_kernel<128, 4, ReduceOp<c10::BFloat16, func_wrapper_t<float, sum_functor>>>", "reductions"),
        ("vectorized_elementwise_kernel<8, addcdiv_cuda_kernel>", "other elementwise"),
        ("cudaGraphLaunch", "other"),
    ],
)
def test_a_profile_sorts_gpu_kernels_by_the_work_their_names_say(name, kind):
    from peftbench.tracking import kernel_kind

    assert kernel_kind(name) == kind


def test_a_profile_counts_kernels_only_once_and_no_annotation_or_marker_as_one():
    """On the GPU's timeline torch.profiler also records the optimizer's annotation, spanning the kernels it
    launched (an H100 profile counted fused AdamW's 1.6 ms twice), and CUPTI's launch-queue markers."""
    from types import SimpleNamespace as Event

    from peftbench.tracking import is_kernel

    cuda, cpu = "DeviceType.CUDA", "DeviceType.CPU"
    assert is_kernel(Event(key="nvjet_sm90_tst_96x64", device_type=cuda, is_user_annotation=False))
    assert not is_kernel(Event(key="Optimizer.step#AdamW.step", device_type=cuda, is_user_annotation=True))
    assert not is_kernel(Event(key="Command Buffer Full", device_type=cuda, is_user_annotation=False))
    assert not is_kernel(Event(key="aten::_fused_adamw_", device_type=cpu, is_user_annotation=False))


@pytest.mark.parametrize(
    "train", [{}, {"optimizer": "adamw_bf16", "precision": "bf16"}], ids=["adamw", "bf16"]
)
def test_killed_run_resumes_from_its_last_epoch(tiny_encoder, tiny_data, tmp_path, monkeypatch, train):
    """The checkpoint holds the weights and optimizer state (optimi's Kahan buffers and step counts too)."""
    raw = study(
        tiny_encoder,
        tiny_data,
        ["full"],
        isolation="process",
        train={"epochs": 3, **train},
        checkpoint_every_seconds=0,
    )
    (clean,) = run_study(raw, tmp_path / "clean")
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "full:exit_after_epoch=2")
    (killed,) = run_study(raw, tmp_path / "s")
    assert killed["status"] == "failed" and "status 137" in killed["error"]
    run_dir = tmp_path / "s" / "runs" / killed["run_id"]
    assert (run_dir / "checkpoint.pt").exists()
    monkeypatch.delenv("PEFTBENCH_INJECT_FAULT")
    (resumed,) = run_study(raw, tmp_path / "s")
    assert resumed["status"] == "success" and not (run_dir / "checkpoint.pt").exists()
    assert resumed["metrics"]["resumed_from_epoch"] == 2 and clean["metrics"]["resumed_from_epoch"] is None
    # The resumed run continued the same trajectory: identical history and test predictions.
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in clean["history"]]
    assert resumed["test_predictions"] == clean["test_predictions"]


def test_a_run_killed_at_its_best_epoch_resumes_to_the_same_choice(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    """With `select_best_epoch`, a checkpoint taken at the best epoch so far holds the weights once (not again
    as the best epoch's); the resumed run still keeps that epoch's weights when no later one beats it."""
    import torch

    train = {"epochs": 3, "select_best_epoch": True, "learning_rate": 1e-6}
    raw = study(
        tiny_encoder, tiny_data, ["full"], isolation="process", train=train, checkpoint_every_seconds=0
    )
    (clean,) = run_study(raw, tmp_path / "clean")
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "full:exit_after_epoch=1")
    (killed,) = run_study(raw, tmp_path / "s")
    ck = torch.load(tmp_path / "s" / "runs" / killed["run_id"] / "checkpoint.pt", weights_only=True)
    assert ck["best_epoch"] == 1 and ck["best_state"] is None and ck["trainable"]
    monkeypatch.delenv("PEFTBENCH_INJECT_FAULT")
    (resumed,) = run_study(raw, tmp_path / "s")
    assert resumed["metrics"]["resumed_from_epoch"] == 1
    assert resumed["metrics"]["selected_epoch"] == clean["metrics"]["selected_epoch"]
    assert resumed["test_predictions"] == clean["test_predictions"]


def test_corrupt_result_is_moved_aside_and_redone(tiny_encoder, tiny_data, tmp_path, capsys):
    raw = study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 1})
    (first,) = run_study(raw, tmp_path / "s")
    path = tmp_path / "s" / "runs" / first["run_id"] / "result.json"
    path.write_text('{"status": "succ')
    (again,) = run_study(raw, tmp_path / "s")
    assert again["status"] == "success" and again["started_at"] > first["started_at"]
    assert list(path.parent.glob("result.json.corrupt-*"))
    assert "was corrupt" in capsys.readouterr().err


def test_two_studies_cannot_share_a_folder(tmp_path):
    with store.StudyLock(tmp_path):
        with pytest.raises(UserError, match="another peftbench"):
            with store.StudyLock(tmp_path):
                pass
    with store.StudyLock(tmp_path):  # released again
        pass


def test_max_length_beyond_the_model(tiny_encoder, tiny_data, tmp_path):
    with pytest.raises(UserError, match="exceeds what model"):
        run_study(study(tiny_encoder, tiny_data, ["lora"], train={"max_length": 4096}), tmp_path / "s")


def test_qlora_runs_on_cpu(tiny_encoder, tiny_data, tmp_path):
    """bitsandbytes 4-bit works on the CPU here, so QLoRA is trained and tested, never skipped."""
    (res,) = run_study(study(tiny_encoder, tiny_data, ["qlora"]), tmp_path / "s")  # 2 epochs: eval between
    assert res["status"] == "success", res.get("error")
    assert len(res["history"]) == 2 and res["reload_check"]["identical_predictions"]
    adapter = json.loads(
        (tmp_path / "s" / "runs" / res["run_id"] / "adapter" / "adapter_config.json").read_text()
    )
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "SEQ_CLS"
    from peftbench.predict import load_trained

    model = load_trained(tmp_path / "s" / "runs" / res["run_id"])
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds


def fake_mps_control(folder: Path, monkeypatch) -> Path:
    """A stand-in for NVIDIA's MPS control program first on PATH, with no daemon serving yet: it logs each
    call (its arguments, what it reads and its pipe folder) and makes or removes the daemon's `control`
    pipe as `-d` or `quit` asks. Returns its log."""
    from peftbench import devices

    log = folder / "mps-calls.log"
    script = folder / devices.MPS_CONTROL
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; cmd=-d;\n'
        'else cmd=$(cat); rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"; fi\n'
        f'echo "$cmd $CUDA_MPS_PIPE_DIRECTORY" >> {log}\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(devices, "MPS_DEFAULT_PIPES", folder / "no-daemon-here")
    return log


def test_concurrent_runs_are_flagged_in_the_report(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    """Two runs sharing the device (forked workers started from two threads): both succeed, each with half
    the CPU's cores as torch threads, and the report says that their timings were taken under contention;
    finals run alone by default, with every core, and are not flagged. With `mps` (its daemon a stand-in,
    the device taken for a GPU) both runs are clients of the one daemon the study started and quit."""
    import torch

    from peftbench import report

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    calls = fake_mps_control(tmp_path, monkeypatch)
    monkeypatch.setattr(runner.Study, "mps_unapplied", lambda self: None)

    raw = study(
        tiny_encoder,
        tiny_data,
        ["lora", "ia3"],
        train={"epochs": 1},
        isolation="process",
        parallel=2,
        exclusive_finals=False,
        mps=True,
    )
    results = run_study(raw, tmp_path / "shared")
    assert [r["status"] for r in results] == ["success", "success"]
    assert {r["config"]["concurrent_runs"] for r in results} == {2}
    assert {r["environment"]["torch_threads"] for r in results} == {max(1, cores // 2)}
    (pipes,) = {r["environment"]["cuda_mps_pipe_directory"] for r in results}
    assert calls.read_text().splitlines() == [f"-d {pipes}", f"quit {pipes}"] and not Path(pipes).exists()
    text = report.write_report(tmp_path / "shared")["markdown"].read_text()
    assert "measured under contention" in text and "under NVIDIA MPS" in text
    alone = run_study({**raw, "exclusive_finals": True, "mps": False}, tmp_path / "alone")
    assert {r["config"]["concurrent_runs"] for r in alone} == {1}
    assert {r["environment"]["torch_threads"] for r in alone} == {torch.get_num_threads()}
    assert {r["environment"]["cuda_mps_pipe_directory"] for r in alone} == {None}
    assert report.load_study(tmp_path / "alone")["concurrent_runs"] == 1
    assert "contention" not in report.write_report(tmp_path / "alone")["markdown"].read_text()


def test_mps_is_started_only_where_runs_share_a_gpu_and_not_twice(tmp_path, monkeypatch):
    from peftbench import devices

    def study_on(device: str, cfg: dict) -> runner.Study:  # what `mps_unapplied` reads, nothing prepared
        me = runner.Study.__new__(runner.Study)
        me.device, me.cfg = device, cfg
        return me

    cfg = {"executor": "local", "isolation": "process", "parallel": 4, "exclusive_finals": False}
    why = runner.Study.mps_unapplied
    assert why(study_on("cuda", {**cfg, "lr_search": False})) is None
    assert "on the CPU" in why(study_on("cpu", {**cfg, "lr_search": False}))
    assert "one at a time" in why(study_on("cuda", {**cfg, "parallel": 1, "lr_search": True}))
    finals_alone = {**cfg, "exclusive_finals": True}
    assert "one at a time" in why(study_on("cuda", {**finals_alone, "lr_search": False}))
    assert why(study_on("cuda", {**finals_alone, "lr_search": True})) is None  # trials share
    assert "executor" in why(study_on("cuda", {**cfg, "executor": "ray", "lr_search": False}))

    calls = fake_mps_control(tmp_path, monkeypatch)
    with devices.mps_daemon() as env:
        folder = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
        assert (folder / "control").exists() and env["CUDA_MPS_LOG_DIRECTORY"] == str(folder)
    assert not folder.exists() and len(calls.read_text().splitlines()) == 2
    with pytest.raises(KeyboardInterrupt), devices.mps_daemon() as env:  # quit however the block ends
        raise KeyboardInterrupt
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists() and len(calls.read_text().splitlines()) == 4
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))  # the user's own daemon: used, not doubled
    with devices.mps_daemon() as env:
        assert env == {}
    assert len(calls.read_text().splitlines()) == 4
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="nvidia-cuda-mps-control is not on PATH"), devices.mps_daemon():
        pass


def test_runs_sharing_a_cpu_share_its_cores_unless_the_user_says_how_many_threads(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    share = runner.Study.thread_env
    assert share(SimpleNamespace(device="cpu"), 3) == {"OMP_NUM_THREADS": "2"}
    assert share(SimpleNamespace(device="cpu"), 16) == {"OMP_NUM_THREADS": "1"}
    assert share(SimpleNamespace(device="cpu"), 1) == {}  # one run at a time: torch's own default
    assert share(SimpleNamespace(device="cuda"), 4) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert share(SimpleNamespace(device="cpu"), 4) == {}  # the user's, as it is


def test_runs_are_forked_from_the_preloaded_server_unless_turned_off(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    raw = study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1}, isolation="process")
    (res,) = run_study(raw, tmp_path / "forked")
    assert res["status"] == "success" and res["environment"]["worker"] == "forked"
    (q,) = run_study({**raw, "methods": ["qlora"]}, tmp_path / "qlora")  # imports bitsandbytes after the fork
    assert q["status"] == "success" and q["environment"]["worker"] == "forked", q.get("error")
    # 2 blocks x 6 linear layers quantized; PEFT's LoRA wrappers around q and v are not counted again
    assert q["metrics"]["layers_4bit"] == 12 and res["metrics"]["layers_4bit"] == 0
    monkeypatch.setitem(runner._FORK, "usable", False)  # as PEFTBENCH_FORKSERVER=0 does
    (res,) = run_study(raw, tmp_path / "plain")
    assert res["status"] == "success" and res["environment"]["worker"] == "process"


def test_a_one_line_error_ends_the_command_output_and_all(tmp_path):
    """A bad input's error ends the command's output at once. The forkserver, started to import torch and
    transformers while the input is checked, would hold stdout and stderr open until those imports are done,
    and a pipe (`peftbench run ... | tee log`) would wait for it: here, longer than a fresh interpreter takes
    to import torch and transformers."""
    import subprocess

    def seconds(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
        t = time.perf_counter()
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
        return time.perf_counter() - t, done

    imports, _ = seconds(["-c", "import torch, transformers"])
    argv = ["-m", "peftbench", "run", "--model", "minilm", "--data", str(tmp_path / "nowhere")]
    took, done = seconds([*argv, "--out", str(tmp_path / "out")])
    assert done.returncode == 2 and "not found; pass --data" in done.stderr, done.stderr
    assert took < imports, (took, imports)


def test_a_wrong_data_path_is_said_before_torch_is_imported(tmp_path):
    """The data are read before the device is resolved: a wrong path, the commonest first mistake, is said
    without the second or two that importing torch takes."""
    argv = ["run", "--model", "minilm", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
    code = (
        f"from peftbench import cli\ntry:\n    cli.main({argv!r})\n"
        "except SystemExit as e:\n    print(e.code)\nprint('torch' in sys.modules)"
    )
    out = fresh_python(code).split()
    assert out == ["2", "False"], out


def test_preload_imports_peft_but_not_bitsandbytes():
    """bitsandbytes queries the GPU when imported (cuda_specs -> torch.cuda.get_device_capability), which
    initialises CUDA in the forkserver and makes every forked GPU worker unusable, and its import takes 8.7 s
    on the H200 machine; the preload imports peft without it and leaves it importable for QLoRA runs."""
    out = fresh_python(
        "import importlib\nfrom peftbench import runner\n"
        "[importlib.import_module(m) for m in runner.PRELOAD]\n"
        "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))\n"
        "from peft.import_utils import is_bnb_4bit_available\nprint(is_bnb_4bit_available())"
    )
    assert out.strip().splitlines()[-2:] == ["['peft']", "True"]


def test_runs_import_the_scoring_libraries_in_a_thread_once_the_model_is_loaded(
    tiny_encoder, tiny_data, tmp_path
):
    """scikit-learn and scipy.stats (about a second to import on a 2-core CPU) are needed at a run's first
    validation only: the forkserver leaves them out, so that runs start sooner, and a run's setup starts
    importing them in a thread once its model is loaded (beside a model load they slowed it)."""
    out = fresh_python(
        "import threading\nfrom pathlib import Path\n"
        "from conftest import set_up_recipe, study\nfrom peftbench import runner\n"
        "print(sorted(m for m in runner.PRELOAD if m.split('.')[0] in ('sklearn', 'scipy')))\n"
        "before = 'sklearn.metrics' in sys.modules\n"
        f"raw = study({str(tiny_encoder)!r}, {str(tiny_data)!r}, ['lora'])\n"
        f"set_up_recipe(raw, Path({str(tmp_path)!r}))\n"
        "started = [t for t in threading.enumerate() if t.name == 'metrics-imports']\n"
        "[t.join() for t in started]\n"
        "print(before, len(started), 'sklearn.metrics' in sys.modules, 'scipy.stats' in sys.modules)"
    )
    assert out.strip().splitlines()[-2:] == ["[]", "False 1 True True"], out[-500:]


def test_lora_run_leaves_bitsandbytes_unimported_and_qlora_still_finds_it(tiny_encoder, tiny_data, tmp_path):
    """peft's LoRA/IA3 layer dispatch imports bitsandbytes when it is installed (4 s per run on the H200
    machine); runs that quantize nothing build their model without it, and a QLoRA run in the same process
    still quantizes (peft's cached `is_bnb_available` is cleared)."""
    out = fresh_python(
        "from pathlib import Path\n"
        "from conftest import run_study, study\n"
        f"enc, data, out = {str(tiny_encoder)!r}, {str(tiny_data)!r}, Path({str(tmp_path)!r})\n"
        "(r, i) = run_study(study(enc, data, ['lora', 'ia3'], train={'epochs': 1}), out / 'lora')\n"
        "print('LORA', r['status'], i['status'], 'bitsandbytes' in sys.modules)\n"
        "(q,) = run_study(study(enc, data, ['qlora'], train={'epochs': 1}), out / 'qlora')\n"
        "print('QLORA', q['status'], q['metrics']['layers_4bit'] > 0, 'bitsandbytes' in sys.modules)\n"
    )
    said = [line for line in out.splitlines() if line.startswith(("LORA", "QLORA"))]
    assert said == ["LORA success success False", "QLORA success True True"], out


def test_a_qlora_run_imports_bitsandbytes_without_torchs_compiler(tiny_encoder, tiny_data, tmp_path):
    """bitsandbytes 0.50 wraps generic kernels in torch.compile as it is imported, which imports Inductor (1 s
    of its 1.07-s import on a 2-core CPU); a QLoRA run imports it with compiling off for the import only, and
    torch.compile goes on compiling after it."""
    out = fresh_python(
        "import os\nfrom pathlib import Path\nimport torch\n"
        "from conftest import run_study, study\n"
        f"enc, data, out = {str(tiny_encoder)!r}, {str(tiny_data)!r}, Path({str(tmp_path)!r})\n"
        "(q,) = run_study(study(enc, data, ['qlora'], train={'epochs': 1}), out / 'qlora')\n"
        "print('QLORA', q['status'], q['metrics']['layers_4bit'] > 0, 'bitsandbytes' in sys.modules,\n"
        "      'torch._inductor.compile_fx' in sys.modules, 'TORCHDYNAMO_DISABLE' in os.environ)\n"
        "torch.compile(lambda x: x + 1)\n"
        "print('AFTER', 'torch._inductor.compile_fx' in sys.modules)\n"
    )
    said = [line for line in out.splitlines() if line.startswith(("QLORA", "AFTER"))]
    assert said == ["QLORA success True True False False", "AFTER True"], out[-800:]


@pytest.mark.slow
def test_compiled_run_trains_and_says_how_it_was_compiled(tiny_encoder, tiny_data, tmp_path):
    """`compile: cudagraphs` on the CPU compiles without CUDA graphs (they exist on CUDA only) and says so."""
    (res,) = run_study(
        study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1, "compile": "cudagraphs"}), tmp_path / "s"
    )
    assert res["status"] == "success", res.get("error")
    assert res["metrics"]["compile"] is True and res["metrics"]["pad_to_multiple_of"] == 64
    assert res["reload_check"]["identical_predictions"]
    assert res["history"][0]["train_loss"] > 0


@pytest.mark.parametrize(
    "case, why",
    [
        ({}, None),
        ({"device": "cpu"}, "not a CUDA device"),
        ({"cuda_graphs": False}, "off (cuda_graphs: false)"),
        ({"world": 2}, "data-parallel run"),
        ({"micro": 8}, None),  # a micro-step per graph replay, the gradients adding up
        ({"prefixed": True}, "prefix tuning"),
        ({"method": "adalora"}, "per-step hook (adalora)"),
        ({"method": "prefix_tuning"}, "prefix tuning"),
        ({"mask_mode": "2d"}, "2D attention mask (the model syncs on it)"),
        ({"compiled": "cudagraphs"}, "torch.compile'd run"),
        ({"checkpointing": True}, "gradient checkpointing"),
        ({"work": 7.2e9 * 2 * 512}, None),  # the 8B shape at micro-batch 2: bound by the host
        (
            {"work": 7.2e9 * 16 * 512},
            "a micro-step of 5.9e+13 parameters x tokens (graphs pay up to 8e+12: beyond, the GPU bounds "
            "the step, and the graphs' memory pool doubled reserved memory)",
        ),
    ],
)
def test_which_runs_replay_cuda_graphs_and_why_not(case, why):
    """The rule that decides, per run, whether its steps are graphed; a run that is not says why in its
    metrics."""
    from peftbench import methods as registry
    from peftbench.graphs import StepGraphs
    from peftbench.spec import TrainSettings

    a = {
        "device": "cuda",
        "world": 1,
        "micro": 16,
        "prefixed": False,
        "method": "lora",
        "mask_mode": "4d-bidirectional",
        "compiled": False,
        "cuda_graphs": True,
        "checkpointing": False,
        "work": 22e6 * 16 * 512,
        **case,
    }
    train = TrainSettings(cuda_graphs=a["cuda_graphs"], batch_size=16)
    got = StepGraphs.unsupported(
        train,
        registry.get(a["method"]),
        a["device"],
        a["world"],
        a["micro"],
        a["mask_mode"],
        a["prefixed"],
        a["compiled"],
        a["checkpointing"],
        a["work"],
    )
    assert got == why


def test_graphed_micro_steps_add_gradients_in_multi_tensor_kernels_not_one_per_weight():
    """The graphed step's backward adds its gradients into the existing ones with `_foreach_add_`: the same
    sums, in the same tensors, without autograd's one add per parameter."""
    import torch
    from torch.profiler import profile

    from peftbench.graphs import backward_adding_in_few_kernels

    models, x, y = _twin_models("bert")
    params = [list(m.parameters()) for m in models]

    def steps(backward, m, n):
        for _ in range(n):
            backward(m(input_ids=x, labels=y).loss)

    def adds_outside_foreach(fn) -> int:
        with profile() as prof:
            fn()
        under = {"aten::_foreach_add_"}
        return sum(
            e.name == "aten::add_" and not any(a in under for a in _ancestors(e)) for e in prof.events()
        )

    steps(lambda loss: loss.backward(), models[1], 1)
    steps(lambda loss: backward_adding_in_few_kernels(loss, params[0]), models[0], 1)
    held = [p.grad for p in params[0]]
    few = adds_outside_foreach(
        lambda: steps(lambda loss: backward_adding_in_few_kernels(loss, params[0]), models[0], 2)
    )
    many = adds_outside_foreach(lambda: steps(lambda loss: loss.backward(), models[1], 2))
    assert many - few == 2 * len(params[0])  # autograd's per-parameter adds, gone
    assert all(p.grad is g for p, g in zip(params[0], held))  # what CUDA graphs and the optimizer hold
    for a, b in zip(*params):
        assert torch.equal(a.grad, b.grad)
    steps(lambda loss: backward_adding_in_few_kernels(loss, params[0] * 2), models[0], 1)  # each one twice
    steps(lambda loss: loss.backward(), models[1], 1)
    for a, b in zip(*params):
        assert torch.equal(a.grad, b.grad)  # added once


def test_graphed_steps_write_gradients_over_the_last_ones_and_zero_those_left_without():
    """A step of one micro-step copies its fresh gradients over the last step's (no zeroing pass between
    steps): the gradients of a zeroed model's backward, bit for bit; a parameter this backward pass left
    without a gradient gets zero, unless the caller fills it after (the weight copies' fp32 weights)."""
    import torch

    from peftbench.graphs import WeightCopies, backward_adding_in_few_kernels

    models, x, y = _twin_models("bert")
    params = list(models[0].parameters())
    backward_adding_in_few_kernels(models[0](input_ids=x, labels=y).loss, params, overwrite=True)
    held = [p.grad for p in params]
    x2, y2 = x.flip(0), 1 - y
    backward_adding_in_few_kernels(models[0](input_ids=x2, labels=y2).loss, params, overwrite=True)
    models[1](input_ids=x2, labels=y2).loss.backward()
    assert all(p.grad is g for p, g in zip(params, held))
    for a, b in zip(params, models[1].parameters()):
        assert torch.equal(a.grad, b.grad)
    head = models[0].classifier.weight
    before = head.grad.clone()
    backward_adding_in_few_kernels(
        models[0].bert.embeddings(x).sum(), params, overwrite=True, filled_after={id(head)}
    )
    assert models[0].bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert torch.equal(models[0].classifier.bias.grad, torch.zeros_like(models[0].classifier.bias))
    assert torch.equal(head.grad, before)  # left for the caller
    copies = WeightCopies(models[0])
    for w in copies.weights:
        w.grad = torch.ones_like(w)
    for add, expect_zero in ((True, False), (False, True)):  # no copy got a gradient this step
        copies.gradients_into_weights(add=add)
        assert all(bool(w.grad.abs().sum() == 0) == expect_zero for w in copies.weights)


@pytest.mark.parametrize("max_norm", [0.01, 1e3])
def test_clipping_folded_into_the_fused_optimizer_updates_as_clip_grad_norm(max_norm):
    """Gradient clipping's scale handed to torch's fused AdamW as its `grad_scale` (GradScaler's contract)
    updates the weights as `clip_grad_norm_` then the step do, where clipping bites and where it does not."""
    from types import SimpleNamespace

    import torch

    from peftbench.graphs import StepGraphs, clipping_scale, folds_clipping

    models, x, y = _twin_models("bert")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
    assert folds_clipping(opts[1]) and not folds_clipping(torch.optim.AdamW(models[0].parameters()))
    scale = torch.ones(())
    for step in range(3):
        for m in models:
            m(input_ids=x.roll(step, 0), labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
        opts[0].step()
        clipping_scale([p.grad for p in models[1].parameters()], max_norm, scale)
        assert (scale > 1) == (max_norm < 1)
        StepGraphs.optimizer_step(SimpleNamespace(clip_scale=scale), opts[1])
        assert not hasattr(opts[1], "grad_scale")
        for o in opts:
            o.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-6)  # Adam divides by tiny second moments
    assert not torch.equal(
        next(models[0].parameters()), _twin_models("bert")[0][0].bert.embeddings.word_embeddings.weight
    )


@pytest.mark.parametrize("arch", ["bert", "llama-lora"])
def test_bf16_weight_copies_give_autocasts_losses_and_gradients_bit_for_bit(arch):
    """A graphed step computes with bf16 copies of the trained linear weights in their places, refreshed by
    one multi-tensor copy, and puts their gradients into the fp32 ones: the same loss and the same fp32
    gradients, bit for bit, as bf16 autocast casting every weight, over micro-steps that add up too."""
    import torch

    from peftbench.graphs import WeightCopies

    models, x, y = _twin_models(arch)
    copies = WeightCopies(models[1])
    linear = [
        p
        for m in models[1].modules()
        if type(m) is torch.nn.Linear
        for p in m.parameters(recurse=False)
        if p.requires_grad
    ]
    assert len(copies) == len(linear) > 0 and all(c.dtype == torch.bfloat16 for c in copies.copies)
    before = dict(models[1].named_parameters())
    for add in (False, True):  # one micro-step, then a second one adding up
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = models[0](input_ids=x, labels=y).loss
        plain.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16), copies.in_place():
            copied = models[1](input_ids=x, labels=y).loss
        copied.backward()
        assert all(c.grad is not None and c.grad.dtype == torch.bfloat16 for c in copies.copies)  # used
        copies.gradients_into_weights(add=add)
        assert torch.equal(plain, copied)
        assert all(c.grad is None for c in copies.copies)
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            assert (a.grad is None) == (b.grad is None), name
            assert a.grad is None or torch.equal(a.grad, b.grad), name
    after = dict(models[1].named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in before.items())  # the weights are back
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert copies.same_loss(lambda *b: models[1](input_ids=b[0], labels=b[1]).loss, (x, y), bf16)


def test_a_model_casting_by_its_weights_dtype_trains_without_weight_copies():
    """Where a model casts activations to a linear weight's dtype (as T5's feed-forward does), bf16 copies
    would change what it computes: the check on the first batch finds the loss changed."""
    import torch

    from peftbench.graphs import WeightCopies, weight_copies

    class Casting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(x.to(self.lin.weight.dtype) * 1.001 + 0.3).float().pow(2).mean()

    torch.manual_seed(0)
    model = Casting()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert not WeightCopies(model).same_loss(model, (torch.randn(16, 8),), bf16)
    assert weight_copies(model, None, "multi-tensor") == (None, "off: no bf16 autocast")
    assert weight_copies(model, torch.bfloat16, "per parameter: under a GPU memory budget")[1] == (
        "off: gradients added per parameter: under a GPU memory budget"
    )
    model.lin.requires_grad_(False)
    off = weight_copies(model, torch.bfloat16, "multi-tensor")
    assert off == (None, "off: no trained fp32 linear weights")


def test_bf16_layer_norms_keep_an_encoders_residual_stream_in_bf16(tiny_encoder, tiny_data, tmp_path):
    """`train.layer_norms: bf16` (auto's choice on CUDA): under bf16 autocast the norms give bf16 where
    autocast's give fp32, with the same parameters (fp32, trained); without autocast they compute exactly as
    before; and a run trained with them follows the same loss trajectory as one with the CPU's default
    (fp32 norms), within bf16's rounding."""
    import torch

    from peftbench import norms

    models, x, y = _twin_models("bert")
    assert norms.bf16_layer_norms(models[1]) == 5  # the embeddings' and two per layer
    assert models[0].state_dict().keys() == models[1].state_dict().keys()
    assert torch.equal(models[0](input_ids=x).logits, models[1](input_ids=x).logits)
    dtypes: list[list] = [[], []]
    for m, seen in zip(models, dtypes):
        for norm in (n for n in m.modules() if isinstance(n, torch.nn.LayerNorm)):
            norm.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.dtype))
    losses = []
    for m in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(m(input_ids=x, labels=y).loss)
        losses[-1].backward()
    assert set(dtypes[0]) == {torch.float32} and set(dtypes[1]) == {torch.bfloat16}
    assert torch.allclose(losses[0].float(), losses[1].float(), rtol=2e-2)
    norm = models[1].bert.encoder.layer[0].output.LayerNorm
    assert norm.weight.dtype == norm.weight.grad.dtype == torch.float32
    norms.fp32_layer_norms(models[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        models[1](input_ids=x)
    assert dtypes[1][-1] == torch.float32

    train_settings = {"precision": "bf16", "learning_rate": 1e-2}
    runs = _trained_twice(tiny_encoder, tiny_data, tmp_path, train_settings, {}, {"layer_norms": "bf16"})
    assert [m["layer_norms"] for _, m in runs] == [
        "fp32: auto uses bf16 layer norms on CUDA only",
        "bf16: 5 layer norms",
    ]
    curves = [c for c, _ in runs]
    assert curves[0] != curves[1]  # the second run trained with the bf16 norms
    assert curves[0][-1] < curves[0][0] / 2  # and learned: 0.59 to 0.04 on the CPU, 2026-12-05
    assert len(curves[1]) == 2 and all(abs(a - b) <= 0.02 for a, b in zip(*curves)), curves


def test_layer_norms_that_change_the_logits_stay_fp32(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    """The probe behind `layer_norms: auto` (on CUDA; here on the CPU as there) keeps fp32 norms where bf16
    ones would move the logits (here a stand-in that scales each norm's output by 1.5), and says so; `bf16`
    insists; without bf16 autocast there are none, and `bf16` there is an error that says what to set."""
    import torch

    from peftbench import norms

    model, x, _ = _twin_models("bert")
    seqs = [np.asarray(r) for r in x.tolist()]
    args = (seqs, 0, "cpu", None)
    probed = dict(probe_on_cpu=True)
    assert (
        norms.choose_layer_norms(model[0], *args, "auto", torch.bfloat16, **probed) == "bf16: 5 layer norms"
    )
    norms.fp32_layer_norms(model[0])
    monkeypatch.setattr(norms.Bf16LayerNorm, "forward", lambda n, x: 1.5 * torch.nn.LayerNorm.forward(n, x))
    why = norms.choose_layer_norms(model[0], *args, "auto", torch.bfloat16, **probed)
    assert why.startswith("fp32: bf16 layer norms moved the logits by"), why
    assert not any(isinstance(m, norms.Bf16LayerNorm) for m in model[0].modules())  # every norm back
    assert norms.choose_layer_norms(model[0], *args, "bf16", torch.bfloat16) == "bf16: 5 layer norms"
    assert norms.choose_layer_norms(model[1], *args, "auto", None) == "fp32: no bf16 autocast"
    answers = ["bf16: 5 layer norms", "fp32 (layer_norms: fp32)", why, None]  # None: a run from before
    assert [norms.chosen(a) for a in answers] == ["bf16", "fp32", "fp32", "fp32"]
    with pytest.raises(UserError, match="layer_norms: bf16 needs bf16 autocast"):
        norms.choose_layer_norms(model[1], *args, "bf16", None)
    with pytest.raises(
        UserError, match="layer_norms: bf16 layer norms need bf16 autocast, not precision fp32"
    ):
        config.validate(
            study(tiny_encoder, tiny_data, ["full"], train={"precision": "fp32", "layer_norms": "bf16"})
        )


def test_a_run_with_bf16_layer_norms_reloads_with_them(tiny_encoder, tiny_data, tmp_path):
    """A saved run predicts as trained: `peftbench predict` and the reload check load it with the layer norms
    its run used: those `layer_norms: bf16` asked for, those `auto` chose (its `layer_norms` metric), and
    fp32 ones for runs from before the choice."""
    from peftbench import norms, predict

    train = {"precision": "bf16", "layer_norms": "bf16"}
    (result,) = run_study(study(tiny_encoder, tiny_data, ["full"], train=train), tmp_path / "s")
    assert result["metrics"]["layer_norms"] == "bf16: 5 layer norms"
    assert result["reload_check"]["identical_predictions"], result["reload_check"]
    run_dir = tmp_path / "s" / "runs" / result["run_id"]

    def bf16_norms() -> int:
        return sum(isinstance(m, norms.Bf16LayerNorm) for m in predict.load_trained(run_dir).modules())

    assert bf16_norms() == 5
    result["config"]["train"].pop("layer_norms")  # auto, as a GPU run that chose bf16 norms
    (run_dir / "result.json").write_text(json.dumps(result))
    assert bf16_norms() == 5
    result["metrics"].pop("layer_norms")  # a run from before the choice
    (run_dir / "result.json").write_text(json.dumps(result))
    assert bf16_norms() == 0


@pytest.mark.slow
def test_compiled_blocks_train_as_the_eager_ones(tiny_encoder, no_dropout_encoder, tiny_data, tmp_path):
    """`train.compile: blocks` compiles each transformer layer in place (one compiled code for all, bf16
    norms or not); a run trained so follows the eager run's loss trajectory, padded or packed."""
    import torch._dynamo

    from peftbench import norms, train

    models, x, _ = _twin_models("bert")
    assert train.compile_blocks(models[1]) == 2
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert torch.allclose(models[0](input_ids=x).logits, models[1](input_ids=x).logits, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the second layer reused the first's
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    norms.bf16_layer_norms(models[1])  # one class for every norm: the layers still share their code
    with torch.autocast("cpu", dtype=torch.bfloat16):
        models[1](input_ids=x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

    # with dropout (drawn as eagerly) in padded batches; without it in packed ones, whose compiled
    # attention draws its dropout otherwise
    for model, packing in ((tiny_encoder, False), (no_dropout_encoder, True)):
        torch._dynamo.utils.counters.clear()
        settings = {"precision": "fp32", "learning_rate": 1e-2, "packing": packing}
        (eager, m0), (blocks, m) = _trained_twice(
            model, tiny_data, tmp_path / str(packing), settings, {}, {"compile": "blocks"}
        )
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the second run's layers compiled
        print(
            {
                k: (m0.get(k), m.get(k))
                for k in ("attention_mask", "packing", "layer_norms", "compile", "cuda_graphs")
            }
        )
        assert m["compile"] == "blocks" and m["packing"].startswith("on" if packing else "off"), m["packing"]
        assert packing or eager[-1] < eager[0] / 2  # the padded run learns
        assert len(blocks) == 2 and all(abs(a - b) <= 1e-4 for a, b in zip(eager, blocks)), (eager, blocks)


def test_compile_blocks_needs_repeated_layers():
    """A model without a list of like layers has nothing for `compile: blocks` to compile."""
    import torch

    from peftbench import train

    assert train.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) == 0


def _trained_twice(model, data, tmp_path, train_settings: dict, first: dict, second: dict, contexts=None):
    """(per-epoch training losses, metrics) of a full fine-tuning run with the `first` train settings, then
    of one with the `second` (each within its context of `contexts`, if given)."""
    from peftbench import data as data_mod, train
    from peftbench.runner import Study

    s = Study(config.validate(study(model, data, ["full"], train=train_settings)), tmp_path / "s")
    s.out.mkdir(parents=True)
    s.prepare()
    tok, spec = data_mod.Tokenized.load(s.tok_file), s.final_specs({})[0]
    runs = []
    for i, (changes, context) in enumerate(zip((first, second), contexts or [contextlib.nullcontext()] * 2)):
        (tmp_path / f"run{i}").mkdir()
        with context:
            res = train.train_run(spec.with_train(**changes), tok, tmp_path / f"run{i}", progress=False)
        runs.append(([h["train_loss"] for h in res["history"]], res["metrics"]))
    return runs


def _twin_models(arch: str) -> tuple[list, object, object]:
    """Two identical tiny models (BERT, or Llama under LoRA with random B), and a batch of ids and labels."""
    import torch

    models = [_tiny_model(arch) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    return models, torch.randint(0, 50, (4, 9)), torch.tensor([0, 1, 1, 0])


def _tiny_model(arch: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if arch == "bert":
        cfg = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
        return BertForSequenceClassification(cfg).eval()
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=0,
    )
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(LlamaForSequenceClassification(cfg), lora)
    for n, p in model.named_parameters():  # LoRA's B starts at zero: random, so that gradients reach A
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    return model.eval()


def test_graphed_steps_add_large_or_budgeted_gradients_one_parameter_at_a_time():
    """Multi-tensor adds hold every fresh gradient until the backward pass ends: not for gradients over
    2 GB (where adds are large kernels anyway), nor under a memory budget the plan made without them."""
    from peftbench.graphs import gradient_adds

    assert gradient_adds(125_000_000 * 4, budgeted=False) == "multi-tensor"  # roberta-base, fp32
    assert gradient_adds(7_200_000_000 * 2, budgeted=False) == (
        "per parameter: 13.4 GB of gradients (multi-tensor up to 2 GB)"  # the 8B shape, bf16 weights
    )
    assert gradient_adds(1000, budgeted=True) == "per parameter: under a GPU memory budget"


def _ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event.name


# ----------------------------------------------------------------------------------------- stale results,
# folders
def test_changed_data_content_is_a_new_run_not_a_reused_one(tiny_encoder, tmp_path, capsys):
    import pandas as pd
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data")
    raw = study(tiny_encoder, data, ["ia3"], train={"epochs": 1})
    (a,) = run_study(raw, tmp_path / "s")
    df = pd.read_parquet(data / "train.parquet")
    df["text"] = df["text"].str.upper().str.lower() + " again"  # every text changed
    df.to_parquet(data / "train.parquet")
    capsys.readouterr()
    (b,) = run_study(raw, tmp_path / "s")
    err = capsys.readouterr().err
    assert "already done" not in err and "1 study run(s) hold results made under other settings" in err
    assert b["config_hash"] != a["config_hash"] and b["started_at"] > a["finished_at"]


def test_a_folder_belongs_to_one_study(tiny_encoder, tiny_decoder, tiny_data, tmp_path, capsys):
    from peftbench import cli

    run_study(study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 1}), tmp_path / "s")
    other = study(tiny_decoder, tiny_data, ["ia3"], train={"epochs": 1})
    with pytest.raises(UserError, match="holds another study"):
        run_study(other, tmp_path / "s")
    project = tmp_path / "project"
    (project / "report").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are not a peftbench study's"):
        run_study(other, project)
    f = tmp_path / "other.yaml"
    f.write_text(json.dumps(other))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(f), "--out", str(tmp_path / "s"), "--force", "--no-report"])
    assert e.value.code == 0
    archived = list((tmp_path / "s").glob("archive-*/runs/*/result.json"))
    assert len(archived) == 1 and "moved the folder's previous contents" in capsys.readouterr().err


def test_two_study_files_of_one_name_never_share_the_default_folder(
    tiny_encoder, tiny_decoder, tiny_data, tmp_path, monkeypatch
):
    from peftbench import cli

    monkeypatch.chdir(tmp_path)
    for sub, model in (("exp1", tiny_encoder), ("exp2", tiny_decoder)):
        (tmp_path / sub).mkdir()
        raw = study(model, tiny_data, ["ia3"], train={"epochs": 1})
        raw.pop("name", None)
        (tmp_path / sub / "study.yaml").write_text(json.dumps(raw))
        with pytest.raises(SystemExit) as e:
            cli.main(["run", f"{sub}/study.yaml", "--no-report"])
        assert e.value.code == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and folders[0] == "study" and folders[1].startswith("study-")
    models = {
        json.loads((tmp_path / "runs" / f / "study.json").read_text())["study"]["model"] for f in folders
    }
    assert models == {str(tiny_encoder), str(tiny_decoder)}


def test_studies_from_flags_alone_never_share_a_default_folder(
    tiny_encoder, tiny_decoder, tiny_data, tmp_path, monkeypatch, capsys
):
    """Flags-only studies are all named "cli": each other one gets runs/cli-<hash of its model and data>,
    and a study run again goes back to its own folder."""
    from peftbench import cli

    monkeypatch.chdir(tmp_path)
    enc, dec = tiny_encoder, tiny_decoder
    flags = [(enc, []), (dec, []), (enc, ["--train-size", "40"]), (dec, [])]
    for model, extra in flags:
        args = ["run", "--model", str(model), "--data", str(tiny_data), "--methods", "tfidf", *extra]
        with pytest.raises(SystemExit) as e:
            cli.main([*args, "--no-report"])
        assert e.value.code == 0, capsys.readouterr().err[-800:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders][0] == "cli" and len(folders) == 3
    studies = [json.loads((f / "study.json").read_text())["study"] for f in folders]
    assert len({(s["model"], s["data"]["train_size"]) for s in studies}) == 3
    err = capsys.readouterr().err
    assert "already done" in err  # the fourth went back to the second's folder
    assert err.count("holds another study; writing to") == 3
    # a study that fails its checks says its one-line error alone, not where it would have written
    for command in ("run", "plan"):
        with pytest.raises(SystemExit) as e:
            cli.main(
                [command, "--model", str(tmp_path / "no-model"), "--data", str(tiny_data), "--methods", "ia3"]
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert len(list((tmp_path / "runs").iterdir())) == 3
    from peftbench import store

    other = {**studies[0], "data": {**studies[0]["data"], "train_size": 30}}
    alt = tmp_path / "runs" / f"cli-{store.study_identity(other)[:6]}"
    alt.mkdir()
    (alt / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="hold other studies' files; choose a folder with --out"):
        cli._free_default_out(tmp_path / "runs" / "cli", other)


def test_a_plan_after_a_study_of_its_name_takes_its_own_default_folder(
    tiny_encoder, tiny_decoder, tiny_data, tmp_path, monkeypatch
):
    """As `run` does: a plan without --out, where runs/NAME holds another study, writes beside it."""
    from peftbench import cli

    monkeypatch.chdir(tmp_path)
    for sub, model, command in (("exp1", tiny_encoder, "run"), ("exp2", tiny_decoder, "plan")):
        (tmp_path / sub).mkdir()
        raw = study(model, tiny_data, ["ia3"], train={"epochs": 1}, gpu_memory="24GB")
        raw.pop("name", None)
        (tmp_path / sub / "study.yaml").write_text(json.dumps(raw))
        with pytest.raises(SystemExit) as e:
            cli.main([command, f"{sub}/study.yaml", *(["--no-report"] if command == "run" else [])])
        assert e.value.code == 0
    (planned,) = (tmp_path / "runs").glob("study-*/plan.json")
    assert json.loads(planned.read_text())["rows"][0]["status"] == "planned"
    assert (tmp_path / "runs" / "study" / "study.json").exists()


def test_report_names_missing_runs_and_refuses_a_damaged_plan(tiny_encoder, tiny_data, tmp_path):
    import shutil

    from peftbench import report

    results = run_study(
        study(tiny_encoder, tiny_data, ["ia3"], seeds=[0, 1], train={"epochs": 1}), tmp_path / "s"
    )
    shutil.rmtree(tmp_path / "s" / "runs" / results[1]["run_id"])
    md = report.write_report(tmp_path / "s")["markdown"].read_text()
    assert f"{results[1]['run_id']}: planned, no result" in md
    (tmp_path / "s" / "study.json").write_text('{"study": ')
    with pytest.raises(UserError, match="study.json is damaged"):
        report.load_study(tmp_path / "s")


def test_a_study_writes_nothing_outside_its_folder(tiny_encoder, tiny_data, tmp_path):
    """Not even in the temporary folder: importing torch._dynamo (the forkserver's transformers does, and so
    does bitsandbytes in a 4-bit run) makes Inductor's cache folder, $TMPDIR/torchinductor_USER. The study's
    processes keep it in the study's .cache."""
    import subprocess

    f = tmp_path / "s.yaml"
    raw = study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 1})
    f.write_text(json.dumps({**raw, "isolation": "process"}))
    (tmp_path / "tmp").mkdir()
    caches = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")  # this process's torch may have set the first
    env = {k: v for k, v in os.environ.items() if k not in caches}
    proc = subprocess.run(
        [sys.executable, "-m", "peftbench", "run", str(f), "--out", str(tmp_path / "out"), "--no-report"],
        env=dict(env, TMPDIR=str(tmp_path / "tmp"), PEFTBENCH_PROGRESS="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert not list((tmp_path / "tmp").iterdir())
    assert (tmp_path / "out" / ".cache" / "torchinductor").is_dir()


FAIL_LATE = """
import pathlib, sys, time
from peftbench import cli, runner
from peftbench.errors import UserError

out = pathlib.Path(sys.argv[2])
def prepare(self):  # the study's checks fail once the forkserver's imports have made Inductor's folder
    deadline = time.time() + 240
    while not (out / ".cache" / "torchinductor").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    raise UserError(f"data: failed late ({(out / '.cache').is_dir()})")
runner.Study.prepare = prepare
sys.argv = ["peftbench", "run", sys.argv[1], "--out", str(out)]
cli.main()
"""


def test_a_study_that_fails_after_the_forkserver_made_its_caches_leaves_no_folder(
    tiny_encoder, tiny_data, tmp_path
):
    """The forkserver's imports make the compiler caches' folders in STUDY/.cache while the study is checked;
    a study that then fails leaves no folder behind, and nothing in the temporary folder."""
    import subprocess

    f = tmp_path / "s.yaml"
    f.write_text(json.dumps({**study(tiny_encoder, tiny_data, ["ia3"]), "isolation": "process"}))
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = tmp_path / "new" / "study"
    proc = subprocess.run(
        [sys.executable, "-c", FAIL_LATE, str(f), str(out)],
        env=dict(env, TMPDIR=str(tmp_path / "tmp")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr == "peftbench: error: data: failed late (True)\n", proc.stderr
    assert not (tmp_path / "new").exists()
    assert not list((tmp_path / "tmp").iterdir())


def test_compiler_caches_go_in_the_study_folder_unless_the_user_chose_them(tmp_path, monkeypatch):
    from peftbench.runner import compiler_caches, environ

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    caches = compiler_caches(tmp_path / "study")
    inductor = str(tmp_path.resolve() / "study" / ".cache" / "torchinductor")
    assert caches == {"TORCHINDUCTOR_CACHE_DIR": inductor}  # Triton's is the user's
    with environ(caches):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == inductor
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize(
    "how",
    [
        "SIGKILL to the CLI",
        "SIGTERM to the CLI",
        "SIGINT to the process group",
        "SIGINT to the CLI, trials two at a time",
        "SIGINT to the process group, trials two at a time",
    ],
)
def test_a_killed_cli_leaves_no_worker_behind(how, tiny_encoder, tiny_data, tmp_path):
    import signal
    import subprocess

    import psutil

    f = tmp_path / "s.yaml"
    raw = study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 1})
    raw["isolation"] = "process"
    if "two at a time" in how:  # warm trial workers, run from threads: none may keep the CLI waiting
        raw.update(lr_search={"points": 4, "decades": 1}, parallel=2)
    f.write_text(json.dumps(raw))
    (tmp_path / "tmp").mkdir()
    env = dict(
        os.environ, PEFTBENCH_INJECT_FAULT="ia3:hang", PEFTBENCH_PROGRESS="0", TMPDIR=str(tmp_path / "tmp")
    )
    err = open(tmp_path / "stderr.txt", "w")
    cli = subprocess.Popen(
        [sys.executable, "-m", "peftbench", "run", str(f), "--out", str(tmp_path / "out")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
        # A user's terminal delivers Ctrl-C: SIGINT as Python expects it at start-up. Inherited as ignored
        # (as an earlier test in the same pytest worker can leave it), Python keeps ignoring it, rightly.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "out").glob("runs/*/crash.log")) and time.time() < deadline:
            time.sleep(0.5)  # the worker has started once it opened its crash log
        family = psutil.Process(cli.pid).children(recursive=True)
        assert family, "no worker was started"
        sig = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}[how.split()[0]]
        if "group" in how:
            os.killpg(cli.pid, sig)
        else:
            os.kill(cli.pid, sig)
        cli.wait(30)
        gone, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        text = (tmp_path / "stderr.txt").read_text()
        assert "Traceback" not in text, text[-2000:]
        if sig != signal.SIGKILL:
            assert cli.returncode == 130 and "interrupted" in text, text[-1000:]
            assert not list((tmp_path / "tmp").iterdir())  # nothing left behind in the temporary folder
    finally:
        err.close()
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)


def test_each_run_stores_auditable_predictions(tiny_encoder, tiny_data, tmp_path):
    import hashlib

    import pandas as pd

    from peftbench import cli
    from peftbench import data as data_mod

    raw = study(tiny_encoder, tiny_data, ["ia3", "tfidf"], train={"epochs": 1})
    results = {r["method"]: r for r in run_study(raw, tmp_path / "s")}
    d = data_mod.load(config.validate(raw)["data"])
    for method, r in results.items():
        df = pd.read_parquet(tmp_path / "s" / "runs" / r["run_id"] / "predictions.parquet")
        assert list(df["row"]) == list(d.rows["test"]), method
        assert df["text_sha1"][0] == hashlib.sha1(d.texts["test"][0].encode()).hexdigest()
        assert list(df["label"]) == [d.label_names[i] for i in d.labels["test"]]
        assert list(df["prediction"]) == [d.label_names[i] for i in r["test_predictions"]], method
        probs = df[[f"p_{n}" for n in d.label_names]].to_numpy()
        assert abs(probs.sum(1) - 1).max() < 1e-5
    out = tmp_path / "p.parquet"
    run_dir = tmp_path / "s" / "runs" / results["ia3"]["run_id"]
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", str(run_dir), "good film", "awful plot", "--output", str(out)])
    assert e.value.code == 0
    got = pd.read_parquet(out)
    assert list(got["row"]) == [0, 1] and {"text_sha1", "prediction", "p_0", "p_1"} <= set(got.columns)
    from peftbench.predict import predict_texts

    shown = predict_texts(run_dir, ["good film", "awful plot"])  # what the command prints
    assert list(got["prediction"]) == [r["label"] for r in shown]
    assert got["p_1"].tolist() == pytest.approx([r["probabilities"]["1"] for r in shown], abs=1e-4)


def test_progress_off_a_terminal_is_one_line_per_event(tiny_encoder, tiny_data, tmp_path):
    import subprocess

    f = tmp_path / "s.yaml"
    raw = study(tiny_encoder, tiny_data, ["ia3"], train={"epochs": 2})
    f.write_text(json.dumps(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "peftbench", "run", str(f), "--out", str(tmp_path / "o"), "--no-report"],
        env=dict(os.environ, PEFTBENCH_PROGRESS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "\r" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ": epoch " in ln]  # the progress lines alone
    assert [ln.split(",")[0].strip() for ln in lines] == ["ia3: epoch 1/2", "ia3: epoch 2/2"], proc.stderr
    assert any(ln.strip().startswith("ia3-final-") and "test acc" in ln for ln in proc.stdout.splitlines())


def test_a_lock_held_by_a_live_process_is_refused_and_a_dead_ones_taken_over(tmp_path):
    import subprocess

    code = (
        "import sys, time\nfrom peftbench.store import StudyLock\nStudyLock(sys.argv[1]).__enter__()\n"
        "print('locked', flush=True)\ntime.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"another peftbench \\(pid {holder.pid}\\)"):
            store.StudyLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with store.StudyLock(tmp_path):  # the dead holder's lock is gone with it
        assert (tmp_path / ".peftbench.lock").read_text() == str(os.getpid())


def test_the_reload_check_scores_whole_test_batches_spread_over_the_lengths(monkeypatch):
    """Under bf16 a row padded together with other rows rounds differently: the reload check scores some
    of the test pass's own batches again, whole, so that the same arithmetic gives the same logits."""
    from peftbench import artefacts
    from peftbench.batches import eval_batches

    few = eval_batches([np.zeros(n) for n in (5, 1, 3)], 2)
    assert [list(b) for b in artefacts.reload_check_batches(few)] == [[0, 2], [1]]  # few: all of them
    monkeypatch.setattr(artefacts, "RELOAD_CHECK_ITEMS", 10)
    batches = eval_batches([np.zeros(n) for n in range(1000, 0, -1)], 3)  # item 0 the longest
    chosen = artefacts.reload_check_batches(batches)
    assert len(chosen) == 3 and all(any(b is c for b in batches) for c in chosen)
    assert 0 in chosen[0] and 999 in chosen[-1]


def test_a_full_model_saves_in_shards_and_reloads_to_the_same_predictions(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    """A full model's shards are written on a thread while the test pass runs (writing an 8B model is
    bound by the disk), and reload to the same predictions."""
    import threading

    from peftbench import artefacts
    from peftbench import train as train_mod

    events = tmp_path / "events"  # the run may be a forked process: its record comes back in a file
    real_save, real_test = artefacts.save_model, train_mod.Recipe._test

    def save_model(*a, **k):
        with events.open("a") as f:
            f.write(f"save begins on {threading.current_thread().name}\n")
        return real_save(*a, **k)

    def test_pass(self, metrics):
        with events.open("a") as f:
            f.write("test begins\n")
        return real_test(self, metrics)

    monkeypatch.setattr(artefacts, "save_model", save_model)
    monkeypatch.setattr(train_mod.Recipe, "_test", test_pass)
    monkeypatch.setattr(artefacts, "SHARD_SIZE", "100KB")
    monkeypatch.setattr(artefacts, "RELOAD_CHECK_ITEMS", 7)
    raw = study(tiny_encoder, tiny_data, ["full"], train={"eval_batch_size": 3})
    (r,) = run_study(raw, tmp_path / "s")
    lines = sorted(events.read_text().splitlines())  # the two threads' order is the scheduler's
    assert lines == ["save begins on peftbench-save_0", "test begins"], lines
    assert r["status"] == "success", r["error"]
    folder = tmp_path / "s" / "runs" / r["run_id"] / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    check = r["reload_check"]
    assert (
        check["identical_predictions"] and check["items_checked"] == 6 and check["max_abs_logit_diff"] < 1e-5
    )
    assert r["metrics"]["phase_seconds"]["save"] > 0


def test_the_trained_model_is_freed_before_the_reload_check_loads_a_second_copy(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    """Under a memory budget the trained model and its reloaded copy need not fit side by side."""
    import gc
    import weakref

    from peftbench import models
    from peftbench import train as train_mod

    built, seen = [], []
    real_build, real_verify = models.build_model, train_mod.verify_reload

    def build(*a, **k):
        model, head = real_build(*a, **k)
        built.append(weakref.ref(model))
        return model, head

    def verify(*a, **k):
        gc.collect()
        seen.append(built[-1]() is None)
        return real_verify(*a, **k)

    monkeypatch.setattr(models, "build_model", build)
    monkeypatch.setattr(train_mod, "verify_reload", verify)
    (r,) = run_study(study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1}), tmp_path / "s")
    assert r["status"] == "success" and r["reload_check"]["identical_predictions"], r.get("error")
    assert seen == [True]


def test_a_machine_that_compiles_every_import_from_source_is_told_how_to_stop_it(tmp_path, monkeypatch):
    """Where Python writes no bytecode and a package came without any (uv's default), every process of a
    study compiles it again: `bytecode_note` says so, with the command that compiles it once; not where
    Python writes bytecode, nor once the package has it."""
    import compileall

    from peftbench.runner import bytecode_note

    (tmp_path / "bigpkg").mkdir()
    (tmp_path / "bigpkg" / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    note = bytecode_note(dont_write=True, packages=("bigpkg", "not_installed_anywhere"))
    assert "PYTHONDONTWRITEBYTECODE) and bigpkg came without any" in note
    assert note.endswith(f"`python -m compileall -q -j 0 {tmp_path / 'bigpkg'}` compiles them once")
    assert bytecode_note(dont_write=False, packages=("bigpkg",)) is None
    assert compileall.compile_dir(str(tmp_path / "bigpkg"), quiet=1)
    assert bytecode_note(dont_write=True, packages=("bigpkg",)) is None
