"""The memory planner and the memory levers: the fitting logic on a fake probe, sizes, bf16 frozen bases,
8-bit optimizers, the new options' validation and `peftbench plan` on a tiny model (CPU)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import run_study, set_up_recipe, study

from peftbench import cli, config, memory
from peftbench.errors import UserError

GB = 2**30


def fake_probe(need_gb, ckpt_saves=0.5, fixed_gb=2.0):
    """Peak = fixed + need per item (checkpointing keeps `ckpt_saves` of it); OOM above a 24 GB card."""
    calls = []

    def probe(micro, ckpt):
        calls.append((micro, ckpt))
        peak = (fixed_gb + need_gb * micro * (ckpt_saves if ckpt else 1.0)) * GB
        return (None, None) if peak > 24 * GB else (peak, 0.1 * micro)

    return probe, calls


def test_fits_at_the_full_batch_first_try():
    probe, calls = fake_probe(need_gb=0.5)
    fit = memory.plan_micro_batch(probe, 16, "auto", 24 * GB)
    assert (fit.micro_batch_size, fit.gradient_checkpointing) == (16, False) and calls == [(16, False)]


def test_smaller_micro_batch_before_checkpointing():
    probe, calls = fake_probe(need_gb=3.0)  # 16 and 8 do not fit; 4 items: 14 GB
    fit = memory.plan_micro_batch(probe, 16, "auto", 24 * GB)
    assert (fit.micro_batch_size, fit.gradient_checkpointing) == (4, False)
    assert [c[0] for c in calls] == [16, 8, 4] and [t["outcome"] for t in fit.tried] == [
        "out of memory"
    ] * 2 + ["fits"]


def test_checkpointing_when_that_is_what_it_takes():
    probe, _ = fake_probe(need_gb=30.0, ckpt_saves=0.1, fixed_gb=1.0)  # one item: 31 GB, checkpointed: 4 GB
    fit = memory.plan_micro_batch(probe, 16, "auto", 24 * GB)
    assert fit.fits and fit.gradient_checkpointing is True and fit.micro_batch_size == 4
    no = memory.plan_micro_batch(
        fake_probe(need_gb=30.0, ckpt_saves=0.1, fixed_gb=1.0)[0], 16, False, 24 * GB
    )
    assert not no.fits and "micro-batch 1" in no.needed()


def test_does_not_fit_even_with_checkpointing():
    probe, calls = fake_probe(need_gb=10.0, fixed_gb=23.0)
    fit = memory.plan_micro_batch(probe, 12, "auto", 24 * GB)
    assert not fit.fits and fit.micro_batch_size is None
    assert calls == [
        (12, False),
        (6, False),
        (3, False),
        (1, False),
        (12, True),
        (6, True),
        (3, True),
        (1, True),
    ]


def test_the_margin_counts_a_peak_just_under_the_budget_as_over():
    fit = memory.plan_micro_batch(lambda m, c: (23.5 * GB if m == 2 else 10 * GB, 0.1), 2, False, 24 * GB)
    assert fit.micro_batch_size == 1 and fit.tried[0]["outcome"] == "over the margin"


@pytest.mark.parametrize(
    "text, want",
    [
        ("24GB", 24 * GB),
        ("24 GiB", 24 * GB),
        ("500MB", 500 * 2**20),
        ("1.5g", int(1.5 * GB)),
        (512, 512 * 2**20),
    ],
)
def test_sizes(text, want):
    assert memory.parse_size(text, "gpu_memory") == want


@pytest.mark.parametrize("bad", ["lots", "-3GB", "0GB", "12 parsecs", True])
def test_bad_sizes_are_one_line_errors(bad):
    with pytest.raises(UserError, match="gpu_memory: give a size like 24GB"):
        memory.parse_size(bad, "gpu_memory")


def test_a_refusal_says_what_bf16_weights_would_save():
    """8B-shaped full fine-tuning (7.1e9 trained weights) under fused AdamW: 6 bytes a weight less."""
    assert memory.bf16_weights_hint("adamw", 7_104_614_400) == (
        "; train.optimizer: adamw_bf16 would hold its trained weights in 39.7 GB less"
    )
    assert memory.bf16_weights_hint("adamw", 3_416_064) == ""  # LoRA's adapters: not worth a word
    assert memory.bf16_weights_hint("adamw_8bit", 7_104_614_400) == ""


def test_the_plan_table_gives_a_refusal_whole_and_cuts_a_failure_short():
    long = "does not fit in 80.0 GB at micro-batch 1 with gradient checkpointing: needs more than 79.4 GB" + (
        memory.bf16_weights_hint("adamw", 7_104_614_400)
    )
    table = cli.plan_table(
        [
            {"label": "full", "status": "does not fit", "error": long},
            {"label": "lora", "status": "failed", "error": "RuntimeError: " + "x" * 200},
        ],
        "80GB",
    )
    assert long in table and "| no |" in table
    assert "x" * 76 in table and "x" * 77 not in table  # 90 characters with "RuntimeError: "


def test_fits_on_names_the_smallest_card():
    assert memory.fits_on(15_000) == "16 GB" and memory.fits_on(16 * 1024) == "24 GB"
    assert memory.fits_on(200 * 1024) == "> 141 GB" and memory.fits_on(None) == "-"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("base_dtype", "int8", "train.base_dtype: must be one of auto, fp32, bf16, fp16"),
        ("gradient_checkpointing", "sometimes", "train.gradient_checkpointing: must be true, false or auto"),
        ("optimizer", "sgd", "train.optimizer: must be one of adamw, adamw_bf16, adamw_8bit"),
        ("attention_mask", "3d", "train.attention_mask: must be one of auto, 2d"),
        ("packing", "yes", "train.packing: must be true, false or auto"),
    ],
)
def test_new_train_options_are_validated(key, value, message):
    with pytest.raises(UserError) as e:
        config.validate({"model": "m", "data": {"path": "d"}, "methods": ["lora"], "train": {key: value}})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message)


def test_gpu_memory_on_the_command_line_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "x", "--data", str(tmp_path), "--gpu-memory", "huge"])
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "peftbench: error: gpu_memory: give a size like 24GB or 500MB, got 'huge'"
    )


def test_a_learning_rate_written_2e_5_is_a_number():
    s = config.validate(
        {"model": "m", "data": {"path": "d"}, "methods": ["full"], "train": {"learning_rate": "2e-5"}}
    )
    assert s["train"]["learning_rate"] == 2e-5


def test_bf16_base_gives_logits_close_to_fp32_and_trains_fp32_adapters(tiny_encoder, tiny_data, tmp_path):
    import torch

    from peftbench import models
    from peftbench.runner import Study

    raw = study(tiny_encoder, tiny_data, [{"name": "lora", "lora_dropout": 0.0}])
    st = Study(config.validate(raw), tmp_path / "s")
    st.out.mkdir(parents=True)
    st.prepare()
    spec = st.final_specs({})[0]
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    out = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        model, _ = models.build_model(
            spec.with_train(base_dtype=dtype), ["0", "1"], "cpu", 10, torch.bfloat16
        )
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert frozen == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[dtype] = model(input_ids=ids).logits.float()
    assert torch.allclose(out["fp32"], out["bf16"], atol=0.05)


def test_bf16_base_and_8bit_optimizer_train_on_the_cpu(tiny_encoder, tiny_data, tmp_path):
    import torch

    from peftbench.predict import load_trained

    raw = study(
        tiny_encoder,
        tiny_data,
        ["lora", {"name": "bitfit", "label": "bitfit", "optimizer": "adamw_8bit"}],
        train={"base_dtype": "bf16", "precision": "bf16", "epochs": 2},
    )
    raw["methods"][0] = {"name": "lora", "optimizer": "paged_adamw_8bit", "label": "lora-paged"}
    res = {r["label"]: r for r in run_study(raw, tmp_path / "s")}
    assert res["bitfit"]["status"] == "success", res["bitfit"]["error"]
    m = res["bitfit"]["metrics"]
    assert m["base_dtype"] == "bfloat16" and m["optimizer"] == "adamw_8bit"
    losses = [h["train_loss"] for h in res["bitfit"]["history"]]
    assert all(np.isfinite(losses))
    # reloaded as trained: the bf16 base, the trained modules (biases beside their weights) in fp32
    assert res["bitfit"]["reload_check"]["max_abs_logit_diff"] == 0.0, res["bitfit"]["reload_check"]
    model = load_trained(tmp_path / "s" / "runs" / res["bitfit"]["run_id"])
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["bert.embeddings.word_embeddings.weight"] == torch.bfloat16
    assert {dtypes[n] for n in dtypes if n.endswith(".bias")} == {torch.float32}
    assert res["lora-paged"]["status"] == "skipped" and "needs a CUDA GPU" in res["lora-paged"]["error"]


def test_bf16_weights_follow_the_fp32_master_losses_on_the_cpu(no_dropout_encoder, tiny_data, tmp_path):
    """`optimizer: adamw_bf16`: every trained weight in bf16 (full fine-tuning: the whole model; LoRA: its
    adapters and head over the fp32 CPU base), and the losses of fused AdamW over fp32 weights."""
    import torch

    from peftbench import models
    from peftbench.runner import Study

    methods = [
        {"name": name, "label": f"{name}-{opt}", "learning_rate": lr, "optimizer": opt}
        for name, lr in (("full", 1e-3), ("lora", 3e-3))
        for opt in ("adamw", "adamw_bf16")
    ]
    raw = study(no_dropout_encoder, tiny_data, methods, train={"precision": "bf16", "epochs": 4})
    runs = {r["label"]: r for r in run_study(raw, tmp_path / "s")}
    for name in ("full", "lora"):
        fp32, bf16 = runs[f"{name}-adamw"], runs[f"{name}-adamw_bf16"]
        assert bf16["status"] == "success", bf16["error"]
        assert bf16["metrics"]["optimizer"] == "adamw_bf16"
        for a, b in zip(fp32["history"], bf16["history"]):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.01)
        # reloaded in the dtype it trained in, the saved model computes the same logits
        assert bf16["reload_check"]["max_abs_logit_diff"] == 0.0, bf16["reload_check"]
    st = Study(config.validate(raw), tmp_path / "t")
    st.out.mkdir(parents=True)
    st.prepare()
    specs = {s.label: s for s in st.final_specs({})}
    for label, frozen in (("full-adamw_bf16", set()), ("lora-adamw_bf16", {torch.float32})):
        model, _ = models.build_model(specs[label], ["0", "1"], "cpu", 10, torch.bfloat16)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == frozen


def test_bf16_weights_need_bf16_autocast():
    with pytest.raises(UserError) as e:
        config.validate(
            {
                "model": "m",
                "data": {"path": "d"},
                "methods": ["full"],
                "train": {"optimizer": "adamw_bf16", "precision": "fp32"},
            }
        )
    assert e.value.problems == [
        "train.optimizer: adamw_bf16 trains bf16 weights under bf16 autocast, not with precision fp32; set "
        "precision: bf16 (or auto), or optimizer: adamw"
    ]


def test_a_loss_that_goes_nan_ends_the_run_as_diverged(tiny_encoder, tiny_data, tmp_path):
    raw = study(tiny_encoder, tiny_data, [{"name": "full", "learning_rate": 1e10}])
    (r,) = run_study(raw, tmp_path / "s")
    assert r["status"] == "diverged" and "lower the learning rate" in r["error"]
    # what it measured until then is kept: the epoch whose loss went NaN, and its seconds
    assert len(r["history"]) == r["metrics"]["epochs_done"] == 1 and r["metrics"]["train_seconds"] > 0


def test_plan_on_a_tiny_model_prints_a_row_per_method(tiny_encoder, tiny_data, tmp_path, capsys):
    study_file = tmp_path / "s.yaml"
    raw = study(tiny_encoder, tiny_data, ["full", "lora", "tfidf"], seeds=[0, 1])
    study_file.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(study_file), "--out", str(tmp_path / "out")])
    assert e.value.code == 0
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith(("| full ", "| lora "))]
    assert len(rows) == 2 and all("| yes | 16 | off |" in r for r in rows), table
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    lora = next(r for r in plan["rows"] if r["label"] == "lora")
    assert lora["epoch_seconds"] > 0 and lora["study_seconds"] == pytest.approx(2 * lora["run_seconds"])
    assert not list((tmp_path / "out").glob("runs/*/result.json"))  # planned, not trained


def test_the_mask_probe_runs_a_bf16_base_under_autocast(tiny_encoder, tiny_data, tmp_path):
    """A bf16 base with an fp32 head runs only under autocast: the probe must too, or it keeps the 2D mask
    (and the run loses its CUDA graphs)."""
    import torch

    from peftbench import batches, models
    from peftbench.runner import Study

    st = Study(
        config.validate(study(tiny_encoder, tiny_data, ["lora"], train={"base_dtype": "bf16"})),
        tmp_path / "s",
    )
    st.out.mkdir(parents=True)
    st.prepare()
    model, _ = models.build_model(st.final_specs({})[0], ["0", "1"], "cpu", 10, torch.bfloat16)
    seqs = [np.array([2, 5, 6, 3]), np.array([2, 5, 6, 7, 8, 9, 3]), np.array([2] + [5] * 20 + [3])]
    assert (
        batches.choose_mask_mode(model, seqs, 0, "cpu", probe_on_cpu=True, amp=torch.bfloat16)
        == "4d-bidirectional"
    )
    assert batches.choose_mask_mode(model, seqs, 0, "cpu", probe_on_cpu=True, amp=None) == "2d"


@pytest.mark.slow  # fp16 on a CPU without native fp16: about 100 s on 2 cores
def test_fp16_autocast_trains_with_loss_scaling_over_an_fp16_base(tiny_encoder, tiny_data, tmp_path):
    """fp16 (what GPUs without bf16 get under precision: auto): the loss is scaled, the frozen base is fp16,
    the trainable weights fp32, and the run learns what fp32 learns."""
    import torch

    from peftbench import methods
    from peftbench.devices import autocast_dtype
    from peftbench.graphs import StepGraphs
    from peftbench.spec import TrainSettings

    assert autocast_dtype("fp16", "cpu") == torch.float16 and autocast_dtype("fp32", "cuda") is None
    base = {"epochs": 8, "learning_rate": 3e-3}
    runs = {}
    for precision in ("fp32", "fp16"):
        train = {**base, "precision": precision, "base_dtype": precision}
        raw = study(tiny_encoder, tiny_data, ["lora_all"], train=train)
        (runs[precision],) = run_study(raw, tmp_path / precision)
    m = runs["fp16"]["metrics"]
    assert runs["fp16"]["status"] == "success" and m["precision"] == "fp16-autocast, loss scaling"
    assert m["base_dtype"] == "float16"
    why = StepGraphs.unsupported(
        TrainSettings(), methods.get("lora"), "cuda", 1, 16, "2d", False, False, scaled=True
    )
    assert why.startswith("fp16 loss scaling")  # the scaler's overflow check cannot sit inside a graph
    losses = [h["train_loss"] for h in runs["fp16"]["history"]]
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
    assert m["test_accuracy"] >= runs["fp32"]["metrics"]["test_accuracy"] - 0.05 and m["test_accuracy"] > 0.75


def test_nvml_figures_count_this_process_only():
    """Under a parallel study several runs share a GPU: each run's device figure and budget cap count its
    own memory, which NVML lists per process id."""
    from collections import namedtuple

    from peftbench import devices

    proc = namedtuple("proc", "pid usedGpuMemory")
    listed = [proc(11, 5 * 2**30), proc(12, 2**30)]
    assert devices.process_memory(listed, 12) == 2**30
    assert devices.process_memory(listed, 13) is None  # not listed: another pid namespace, fall back
    assert devices.process_memory([proc(12, None)], 12) is None  # a figure NVML hides
    assert devices.process_memory(None, 12) is None  # no NVML at all


def test_the_probe_runs_accumulated_micro_steps_beside_the_gradients(tiny_encoder, tiny_data, tmp_path):
    """Under gradient accumulation every micro-step after the first runs its forward beside the gradients
    summed so far: the probe must too. Without it the plan for 1.36B full fine-tuning under 24 GB missed
    that room, and the run ran out of memory (H200, benchmarks/results/h200-scale-1.4b.json)."""

    def pick(s):
        spec = s.run_spec(config.normalise_methods(["full"], [])[0], None, 0, "final")
        return dataclasses.replace(spec, learning_rate=1e-3).with_train(learning_rate=1e-3)

    recipe = set_up_recipe(study(tiny_encoder, tiny_data, ["full"]), tmp_path, pick)
    seen, real = [], recipe.batch_loss

    def batch_loss(*batch):
        seen.append(any(p.grad is not None for p in recipe.model.parameters()))
        return real(*batch)

    recipe.batch_loss = batch_loss
    recipe.probe(4, False)  # 4 of a batch of 16: two micro-steps per optimizer step, probed twice
    assert seen == [False, True, False, True]
    seen.clear()
    recipe.probe(16, False)  # the whole batch: one
    assert seen == [False, False]


def test_the_probe_leaves_the_bf16_optimizer_as_it_found_it(tiny_encoder, tiny_data, tmp_path):
    """optimi counts steps per parameter group, outside the per-weight state the probe clears: a probe that
    left its two steps there would shift every later step's bias correction."""
    import torch

    raw = study(
        tiny_encoder, tiny_data, [{"name": "full", "optimizer": "adamw_bf16"}], train={"precision": "bf16"}
    )
    recipe = set_up_recipe(raw, tmp_path)
    before = [(g["lr"], g.get("step")) for g in recipe.optimizer.param_groups]
    recipe.probe(16, False)
    after = [(g["lr"], g.get("step")) for g in recipe.optimizer.param_groups]
    assert [lr for lr, _ in after] == [lr for lr, _ in before] and not recipe.optimizer.state
    assert all(
        (a is None and b is None) or (torch.is_tensor(a) and int(a) == int(b))
        for (_, a), (_, b) in zip(after, before)
    ), (before, after)


def test_cuda_index_names_the_current_device_for_a_bare_cuda(monkeypatch):
    """torch's per-device memory calls need an index: "cuda:1" gives 1, "cuda" the current device."""
    from peftbench.devices import cuda_index

    monkeypatch.setattr("torch.cuda.current_device", lambda: 3)
    assert cuda_index("cuda:1") == 1 and cuda_index("cuda") == 3 and cuda_index() == 3


def test_a_planned_smaller_micro_batch_chooses_its_mask_again(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    """Whether a micro-step is graphed (and so wants a ready 4D mask) depends on its size: a memory plan
    that lowers the micro-batch below the graph threshold must decide the mask again, or a budgeted 8B run
    trains eagerly at the micro-batch where graphs pay most."""
    from peftbench import train

    def pick(s):
        spec = s.run_spec(config.normalise_methods(["lora"], [])[0], None, 0, "final")
        return dataclasses.replace(
            spec, learning_rate=1e-3, runtime=dataclasses.replace(spec.runtime, plan_only=True)
        ).with_train(learning_rate=1e-3)

    seen, real = [], train.choose_mask_mode

    def spy(*args, forced, **kw):
        seen.append(forced)
        return real(*args, forced=forced, **kw)

    def plan(probe, batch_size, checkpointing, budget):  # what a budget that holds 2 of 16 plans
        return memory.Fit(budget_mb=budget / 2**20, micro_batch_size=2, gradient_checkpointing=False)

    monkeypatch.setattr(train, "choose_mask_mode", spy)
    monkeypatch.setattr(memory, "plan_micro_batch", plan)
    monkeypatch.setattr(train.Recipe, "step_work", lambda self: float(self.micro))
    monkeypatch.setattr(train, "GRAPHS_MAX_WORK", 4.0)  # graphs pay at micro-batch 2, not at 16
    recipe = set_up_recipe(study(tiny_encoder, tiny_data, ["lora"]), tmp_path, pick)
    assert recipe.micro == 2 and seen == ["2d", "auto"]
    assert recipe.phases["mask_probe"] >= 0 and recipe.phases["packing_probe"] >= 0
