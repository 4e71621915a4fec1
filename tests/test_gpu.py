"""CUDA-only behaviour: the graphed training step, the bf16 frozen base and the GPU memory budget.

Marked `gpu`; skipped on machines without a CUDA GPU."""

from __future__ import annotations

import pytest
from conftest import run_study, study

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    "method, micro, clip", [("full", None, 1.0), ("full", None, 0.01), ("ia3", None, 1.0), ("full", 4, 1.0)]
)
def test_graphed_steps_train_like_eager_ones(no_dropout_encoder, tiny_data, tmp_path, method, micro, clip):
    """Graphed steps, and graphed micro-steps whose gradients add up (micro-batch 4 of 16), follow the
    eager run's losses; so do steps whose clipping (at 0.01, every step) is folded into the fused AdamW."""
    train = {"epochs": 3, "max_length": 48, "micro_batch_size": micro, "max_grad_norm": clip}
    over = {"device": "cuda", "train": train}
    (graphed,) = run_study(study(no_dropout_encoder, tiny_data, [method], **over), tmp_path / "graphs")
    over["train"]["cuda_graphs"] = False
    (eager,) = run_study(study(no_dropout_encoder, tiny_data, [method], **over), tmp_path / "eager")
    for res in (graphed, eager):
        assert res["status"] == "success", res.get("error")
    g = graphed["metrics"]["cuda_graphs"]
    # one eager (micro-)step, then graphs: a shape per padded length (micro-batches of 4 pad to one)
    assert g["failed"] is None and g["graphs"] >= (2 if micro is None else 1) and g["eager_steps"] == 1, g
    assert g["gradient_adds"] == "multi-tensor" and g["weight_copies"].startswith("on: "), g
    assert g["clipping"] == (
        "in the optimizer's kernel" if micro is None else "not in the graphs (none, or after the micro-steps)"
    ), g
    assert eager["metrics"]["cuda_graphs"] == "off (cuda_graphs: false)"
    for hg, he in zip(graphed["history"], eager["history"]):
        assert hg["train_loss"] == pytest.approx(he["train_loss"], rel=2e-3)
    agree = sum(a == b for a, b in zip(graphed["test_predictions"], eager["test_predictions"]))
    assert agree >= len(eager["test_predictions"]) - 1
    assert graphed["reload_check"]["identical_predictions"]


def test_qlora_and_dropout_runs_use_graphs(tiny_encoder, tiny_data, tmp_path):
    """QLoRA's 4-bit layers (bitsandbytes kernels) and dropout (the graphs' own random offsets) are
    captured."""
    runs = run_study(study(tiny_encoder, tiny_data, ["qlora", "lora"], device="cuda"), tmp_path / "s")
    for res in runs:
        assert res["status"] == "success", res.get("error")
        assert res["metrics"]["cuda_graphs"]["failed"] is None, res["metrics"]["cuda_graphs"]
        assert res["metrics"]["cuda_graphs"]["graphs"] >= 1
        losses = [h["train_loss"] for h in res["history"]]
        assert all(x == x and 0 < x < 10 for x in losses), losses  # finite: the graphs computed a loss


def test_a_failed_capture_leaves_its_run_and_the_next_one_training(
    tiny_encoder, tiny_data, tmp_path, monkeypatch
):
    """A capture that fails (here: a host sync inside it) leaves its run training eagerly, dropout
    included, and the next run in the process graphed: the CUDA generator is freed from the failed capture."""
    from peftbench import graphs

    real = graphs.StepGraphs.forward_backward

    def syncing_under_capture(self, *batch):
        real(self, *batch)
        if torch.cuda.is_current_stream_capturing():
            self.loss_sum.item()  # not allowed in a capture

    monkeypatch.setattr(graphs.StepGraphs, "forward_backward", syncing_under_capture)
    (first,) = run_study(study(tiny_encoder, tiny_data, ["full"], device="cuda"), tmp_path / "a")
    monkeypatch.undo()
    (second,) = run_study(study(tiny_encoder, tiny_data, ["full"], device="cuda"), tmp_path / "b")
    for res in (first, second):
        assert res["status"] == "success", res.get("error")
        losses = [h["train_loss"] for h in res["history"]]
        assert all(x == x and 0 < x < 10 for x in losses), losses
    assert first["metrics"]["cuda_graphs"]["failed"].startswith("capture failed: "), first["metrics"]
    assert first["metrics"]["cuda_graphs"]["graphs"] == 0
    assert (
        second["metrics"]["cuda_graphs"]["failed"] is None and second["metrics"]["cuda_graphs"]["graphs"] >= 1
    )


@pytest.fixture
def uncapped():
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)  # inline runs cap this process's allocator


def test_frozen_base_is_bf16_and_reloads_to_the_same_predictions(tiny_encoder, tiny_data, tmp_path):
    """LoRA's adapter, and BitFit's and a head-only run's whole model (fp32 trained modules over the bf16
    base), reload computing the trained model's logits."""
    runs = run_study(
        study(tiny_encoder, tiny_data, ["lora", "bitfit", "head"], device="cuda"), tmp_path / "s"
    )
    for r in runs:
        assert r["status"] == "success", r["error"]
        m = r["metrics"]
        assert m["base_dtype"] == "bfloat16" and r["reload_check"]["max_abs_logit_diff"] == 0.0, r[
            "reload_check"
        ]
        assert m["attention_mask"] == "4d-bidirectional" and m["cuda_graphs"]["graphs"] >= 1, m["cuda_graphs"]
        assert m["peak_memory_reserved_mb"] >= m["peak_memory_allocated_mb"] > 0
        assert m["peak_device_memory_mb"] >= m["peak_memory_reserved_mb"]


def test_a_budget_caps_the_run_and_the_plan_fits_under_it(tiny_encoder, tiny_data, tmp_path, uncapped):
    # The budget counts all the device holds (this test process's earlier tests too): 1 GB beyond that.
    free, total = torch.cuda.mem_get_info()
    budget_mb = (total - free) / 2**20 + 1024
    raw = study(
        tiny_encoder,
        tiny_data,
        ["full", "lora"],
        device="cuda",
        gpu_memory=f"{budget_mb:.0f}MB",
        isolation="process",
        train={"gradient_checkpointing": "auto"},
    )
    for r in run_study(raw, tmp_path / "s"):
        assert r["status"] == "success", r["error"]
        plan = r["metrics"]["memory_plan"]
        assert plan["fits"] and plan["micro_batch_size"] == 16 and plan["gradient_checkpointing"] is False
        assert plan["allocator_cap_mb"] < budget_mb and r["metrics"]["peak_device_memory_mb"] <= budget_mb
        graphs = r["metrics"]["cuda_graphs"]
        assert graphs["gradient_adds"] == "per parameter: under a GPU memory budget", graphs
        assert graphs["weight_copies"] == "off: gradients added per parameter: under a GPU memory budget"


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_bf16"])
def test_the_memory_probe_leaves_training_as_it_was(
    no_dropout_encoder, tiny_data, tmp_path, uncapped, optimizer
):
    """A budgeted run probes micro-steps before it trains, then puts the weights, optimizer state and step
    counters back: its losses are those of the same run without a budget."""
    free, total = torch.cuda.mem_get_info()
    methods = [{"name": "full", "learning_rate": 1e-3, "optimizer": optimizer}]
    over = {"device": "cuda", "isolation": "process", "train": {"epochs": 3, "max_length": 48}}
    (free_run,) = run_study(study(no_dropout_encoder, tiny_data, methods, **over), tmp_path / "free")
    budget = f"{(total - free) / 2**20 + 1024:.0f}MB"
    (capped,) = run_study(
        study(no_dropout_encoder, tiny_data, methods, gpu_memory=budget, **over), tmp_path / "cap"
    )
    for r in (free_run, capped):
        assert r["status"] == "success", r["error"]
    assert capped["metrics"]["memory_plan"]["fits"] and free_run["metrics"]["memory_plan"] is None
    for a, b in zip(free_run["history"], capped["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_warm_trials_replay_the_first_trials_graphs_and_train_as_fresh_ones(
    method, tiny_encoder, tiny_data, tmp_path
):
    """Warm trials (one process, one model) replay the graphs the first trial recorded, reseeded for their
    dropout, and train as trials set up from scratch in a process each do."""
    raw = study(
        tiny_encoder,
        tiny_data,
        [method],
        device="cuda",
        isolation="process",
        lr_search={"points": 2, "decades": 1, "seeds": 2},
        train={"epochs": 2, "max_length": 48},
    )
    runs = {}
    for warm in (True, False):
        res = run_study({**raw, "warm_trials": warm}, tmp_path / str(warm))
        runs[warm] = [r for r in res if r["role"] == "trial"]
    for r in runs[True] + runs[False]:
        assert r["status"] == "success" and r["metrics"]["cuda_graphs"]["graphs"] >= 1, r["error"]
    started = [(r["metrics"]["warm_start"], r["history"][0]["graph_start_seconds"] > 0) for r in runs[True]]
    assert started == [(False, True)] + [(True, False)] * 3  # no eager first step, no capture
    for a, b in zip(runs[True], runs[False]):
        assert [h["train_loss"] for h in a["history"]] == pytest.approx(
            [h["train_loss"] for h in b["history"]], rel=1e-6, abs=0
        )
        assert [h["validation_accuracy"] for h in a["history"]] == [
            h["validation_accuracy"] for h in b["history"]
        ]


def test_a_run_that_cannot_fit_its_budget_is_skipped_with_what_it_needed(
    tiny_encoder, tiny_data, tmp_path, uncapped
):
    raw = study(tiny_encoder, tiny_data, ["full"], device="cuda", gpu_memory="1MB")
    (r,) = run_study(raw, tmp_path / "s")
    assert r["status"] == "skipped" and "does not fit in" in r["error"], r["error"]


def test_a_gpu_state_dict_reaches_host_memory_unchanged():
    from peftbench.artefacts import host_copy

    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200)).cuda()
    model[0].to(torch.bfloat16)
    state = model.state_dict()
    host = host_copy(state, bounce_bytes=1000)  # several trips through the pinned buffer per tensor
    for name, t in state.items():
        assert host[name].device.type == "cpu" and host[name].dtype == t.dtype
        assert torch.equal(host[name], t.cpu()), name


def test_bf16_weights_train_graphed_and_follow_the_fp32_master_losses(
    no_dropout_encoder, tiny_data, tmp_path
):
    """`optimizer: adamw_bf16` on CUDA: bf16 weights under optimi's foreach AdamW with Kahan
    summation, steps replayed from graphs; its losses follow fused AdamW's over fp32 weights."""
    methods = [
        {"name": "full", "label": "fp32", "learning_rate": 1e-3},
        {"name": "full", "label": "bf16", "learning_rate": 1e-3, "optimizer": "adamw_bf16"},
    ]
    over = {"device": "cuda", "train": {"epochs": 4, "max_length": 48}}
    runs = {
        r["label"]: r
        for r in run_study(study(no_dropout_encoder, tiny_data, methods, **over), tmp_path / "s")
    }
    for r in runs.values():
        assert r["status"] == "success", r["error"]
        assert r["metrics"]["cuda_graphs"]["failed"] is None and r["metrics"]["cuda_graphs"]["graphs"] >= 1
    assert (
        runs["bf16"]["metrics"]["base_dtype"] == "bfloat16"
        and runs["bf16"]["metrics"]["optimizer"] == "adamw_bf16"
    )
    for h32, h16 in zip(runs["fp32"]["history"], runs["bf16"]["history"]):
        assert h16["train_loss"] == pytest.approx(h32["train_loss"], rel=0.02)
    assert runs["bf16"]["reload_check"]["identical_predictions"], runs["bf16"]["reload_check"]


def test_compiled_blocks_are_graphed_like_eager_steps(no_dropout_encoder, tiny_data, tmp_path):
    """`compile: blocks` with CUDA graphs: each new shape runs once eagerly (its layers compile outside any
    capture), then replays from its graph; the losses follow the uncompiled run's."""
    over = {"device": "cuda", "train": {"epochs": 2, "max_length": 48, "compile": "blocks"}}
    (blocks,) = run_study(study(no_dropout_encoder, tiny_data, ["full"], **over), tmp_path / "blocks")
    over["train"]["compile"] = False
    (plain,) = run_study(study(no_dropout_encoder, tiny_data, ["full"], **over), tmp_path / "plain")
    for res in (blocks, plain):
        assert res["status"] == "success", res.get("error")
    g = blocks["metrics"]["cuda_graphs"]
    assert blocks["metrics"]["compile"] == "blocks" and g["failed"] is None and g["graphs"] >= 1, g
    assert g["eager_steps"] == g["graphs"], g  # one per shape before its capture, the first step's included
    for hb, hp in zip(blocks["history"], plain["history"]):
        assert hb["train_loss"] == pytest.approx(hp["train_loss"], rel=2e-3)
    assert blocks["reload_check"]["identical_predictions"]
