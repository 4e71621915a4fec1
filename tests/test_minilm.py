"""Smoke run of the real entry point on the real offline MiniLM and real IMDb reviews (shared copy or
sample)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IMDB

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("minilm")]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("quick") / "study"
    env = dict(os.environ, PEFTBENCH_DATA=str(IMDB), PEFTBENCH_PROGRESS="0")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftbench",
            "run",
            "--preset",
            "quick",
            "--train-size",
            "96",
            "--test-size",
            "64",
            "--epochs",
            "1",
            "--max-length",
            "64",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, proc


def test_quick_preset_runs_all_four_methods(quick_study):
    out, proc = quick_study
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout
    for method in ("full", "lora", "qlora", "ia3"):
        assert any(
            line.startswith(f"| {method} |") and line.rstrip().endswith("| success |")
            for line in table.splitlines()
        ), table
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    assert len(results) == 4 and all(r["status"] == "success" for r in results)
    assert all(r["reload_check"]["identical_predictions"] for r in results)
    params = {r["method"]: r["metrics"]["trainable_params"] for r in results}
    assert params["full"] > 20e6 > 1e6 > params["lora"] >= params["qlora"] > params["ia3"] > 0
    assert (out / "report" / "report.html").exists()


def test_predict_command_on_a_real_run(quick_study):
    out, _ = quick_study
    run_dir = next((out / "runs").glob("lora-*"))
    proc = subprocess.run(
        [sys.executable, "-m", "peftbench", "predict", str(run_dir), "A wonderful film.", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[0])
    assert row["label"] in ("0", "1") and abs(sum(row["probabilities"].values()) - 1) < 1e-3
