"""Data-parallel runs (`gpus_per_run` > 1): torchrun processes with gloo on the CPU, the batch kept whole."""

from __future__ import annotations


import pytest
from conftest import run_study, study

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]


@pytest.mark.parametrize("method", ["full", {"name": "lora", "label": "lora", "lora_dropout": 0.0}])
def test_two_processes_follow_the_single_process_trajectory(method, no_dropout_encoder, tiny_data, tmp_path):
    raw = study(
        no_dropout_encoder,
        tiny_data,
        [method],
        isolation="process",
        train={"epochs": 3, "learning_rate": 5e-3, "group_by_length": False},
    )
    (one,) = run_study(raw, tmp_path / "one")
    (two,) = run_study({**raw, "gpus_per_run": 2}, tmp_path / "two")
    assert two["status"] == "success", two.get("error")
    m1, m2 = one["metrics"], two["metrics"]
    assert m2["world_size"] == 2 and len(m2["per_process"]) == 2
    assert m2["steps"] == m1["steps"]  # the batch of 16 is split over the processes, not doubled
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"] - 0.01  # the weights do move
    # Equal to reduction order: a gradient weighted wrongly (e.g. halved by DDP's mean) would diverge far
    # more.
    for h1, h2 in zip(one["history"], two["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=2e-4)
    assert two["reload_check"]["identical_predictions"]
    assert two["config_hash"] != one["config_hash"]


def test_a_failing_data_parallel_run_is_recorded(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "lora:oom_above=1")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # torchrun's logs go to the run folder, not here
    (res,) = run_study(
        study(
            tiny_encoder,
            tiny_data,
            ["lora"],
            isolation="process",
            gpus_per_run=2,
            max_oom_retries=0,
            train={"epochs": 1},
        ),
        tmp_path / "s",
    )
    assert res["status"] == "oom" and "out of memory" in res["error"]
    assert not list((tmp_path / "tmp").iterdir()) and not list((tmp_path / "s").rglob("torchrun"))


@pytest.mark.parametrize("method", ["full", {"name": "lora", "label": "lora", "lora_dropout": 0.0}])
def test_a_sharded_run_follows_the_single_process_trajectory_and_reloads(
    method, no_dropout_encoder, tiny_data, tmp_path
):
    """train.sharding: fsdp (FSDP2 over 2 gloo processes): the same losses as one process, and a saved
    folder that plain transformers / peft reload to the same test predictions."""
    raw = study(
        no_dropout_encoder,
        tiny_data,
        [method],
        isolation="process",
        train={"epochs": 3, "learning_rate": 5e-3, "group_by_length": False, "precision": "fp32"},
    )
    (one,) = run_study(raw, tmp_path / "one")
    sharded = {**raw, "gpus_per_run": 2, "train": {**raw["train"], "sharding": "fsdp"}}
    (two,) = run_study(sharded, tmp_path / "two")
    assert two["status"] == "success", two.get("error")
    assert two["metrics"]["sharding"] == "fsdp" and len(two["metrics"]["per_process"]) == 2
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"] - 0.01
    for h1, h2 in zip(one["history"], two["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=2e-4)
    assert two["reload_check"]["identical_predictions"]
    saved = tmp_path / "two" / "runs" / two["run_id"] / two["artefact"]
    assert (
        saved / ("adapter_model.safetensors" if two["artefact"] == "adapter" else "model.safetensors")
    ).exists()


def test_a_failing_sharded_run_is_recorded(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "full:oom_above=1")
    (res,) = run_study(
        study(
            tiny_encoder,
            tiny_data,
            ["full"],
            isolation="process",
            gpus_per_run=2,
            max_oom_retries=0,
            train={"epochs": 1, "sharding": "fsdp"},
        ),
        tmp_path / "s",
    )
    assert res["status"] == "oom" and "out of memory" in res["error"]


def test_accumulation_with_an_uneven_last_batch_keeps_the_processes_in_step(
    no_dropout_encoder, tiny_data, tmp_path
):
    """117 training items in batches of 16: the last batch of 5 splits 3 / 2 over two processes, which at
    micro-batch 2 need 2 and 1 micro-steps; the second process joins the extra gradient reduction with an
    item at weight 0 instead of leaving the first waiting forever."""
    raw = study(
        no_dropout_encoder,
        tiny_data,
        [{"name": "lora", "label": "lora", "lora_dropout": 0.0}],
        isolation="process",
        data={"train_size": 117},
        train={
            "epochs": 2,
            "learning_rate": 5e-3,
            "group_by_length": False,
            "precision": "fp32",
            "micro_batch_size": 2,
        },
    )
    (one,) = run_study(raw, tmp_path / "one")
    (two,) = run_study({**raw, "gpus_per_run": 2, "max_oom_retries": 0}, tmp_path / "two")
    assert two["status"] == "success", two.get("error")
    for h1, h2 in zip(one["history"], two["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=2e-4)
