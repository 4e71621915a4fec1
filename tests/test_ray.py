"""The Ray executor on a local Ray instance: fan-out, crash recording, and results equal to the local
executor's."""

from __future__ import annotations

import pytest
from conftest import run_study, study

ray = pytest.importorskip("ray", reason="ray is a test extra (pip install -e '.[test]')")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one local Ray instance per test process

COMPARED = ("test_accuracy", "test_macro_f1", "validation_accuracy", "trainable_params", "total_params")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance whose workers' temporary folder (TMPDIR) is the fixture's: it yields it."""
    tmp = tmp_path_factory.mktemp("ray-workers-tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
        runtime_env={"env_vars": {"TMPDIR": str(tmp)}},
    )
    yield tmp
    ray.shutdown()


def test_ray_results_match_the_local_executor(local_ray, tiny_encoder, tiny_data, tmp_path):
    raw = study(tiny_encoder, tiny_data, ["lora", "ia3", "bitfit"], isolation="process", train={"epochs": 1})
    local = run_study(raw, tmp_path / "local")
    remote = run_study({**raw, "executor": "ray"}, tmp_path / "ray")
    assert [r["run_id"] for r in remote] == [r["run_id"] for r in local]
    for a, b in zip(local, remote):
        assert b["status"] == "success" and b["config"]["executor"] == "ray"
        assert b["environment"]["worker"] == "forked"  # from the actor's preloaded forkserver
        assert "cuda_visible_devices" in b["environment"]  # on GPUs: which one Ray gave the run
        assert a["config_hash"] == b["config_hash"]
        assert all(a["metrics"][k] == b["metrics"][k] for k in COMPARED)
        assert a["test_predictions"] == b["test_predictions"]
        assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    again = run_study({**raw, "executor": "ray"}, tmp_path / "ray")  # skip-if-done works the same
    assert [r["started_at"] for r in again] == [r["started_at"] for r in remote]
    assert not list(local_ray.iterdir())  # the actors' forkservers left no folder behind


def test_ray_records_a_crashed_run_and_finishes_the_rest(
    local_ray, tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "ia3:segv")
    res = run_study(
        study(
            tiny_encoder, tiny_data, ["ia3", "lora"], executor="ray", isolation="process", train={"epochs": 1}
        ),
        tmp_path / "s",
    )
    assert res[0]["status"] == "failed" and "SIGSEGV" in res[0]["error"]
    assert res[1]["status"] == "success"


def test_ray_with_inline_isolation_is_refused():
    from peftbench import config
    from peftbench.errors import UserError

    with pytest.raises(UserError, match="inline cannot be used with executor: ray"):
        config.validate(
            {
                "model": "m",
                "data": {"path": "/x"},
                "methods": ["lora"],
                "executor": "ray",
                "isolation": "inline",
            }
        )


def test_ray_retries_a_task_whose_process_died(local_ray, tiny_encoder, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_INJECT_FAULT", "lora:ray_task_dies_once")
    (res,) = run_study(
        study(tiny_encoder, tiny_data, ["lora"], executor="ray", isolation="process", train={"epochs": 1}),
        tmp_path / "s",
    )
    assert res["status"] == "success"
    assert (tmp_path / "s" / "runs" / res["run_id"] / ".ray-task-died").exists()  # it did die once


def test_ray_says_when_the_cluster_has_no_room_for_a_run(local_ray, tiny_encoder, tiny_data, tmp_path):
    from peftbench.errors import UserError

    with pytest.raises(UserError, match="the Ray cluster has 2 CPUs but each run needs 3 CPU"):
        run_study(
            study(
                tiny_encoder,
                tiny_data,
                ["lora"],
                executor="ray",
                isolation="process",
                ray_cpus_per_run=3,
                train={"epochs": 1},
            ),
            tmp_path / "s",
        )
