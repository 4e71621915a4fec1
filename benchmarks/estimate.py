"""The GPU memory estimate (`peftbench plan --gpu-memory` on a machine without a GPU) against the peaks
measured on an H200, on the CPU:

    python benchmarks/estimate.py --tokenizer MINILM_DIR --out benchmarks/results/cpu-memory-estimate.json

Each shape is its config alone (no weights are made): the decoders of `benchmarks/scale.py` with its
methods, and `benchmarks/speed.py`'s roberta-base shape with the seed preset's methods (its frozen base in
fp32). Beside each estimate, the peak allocated memory measured at that method and micro-batch, at length
512: `scale.py`'s plain loop and peftbench (`h200-scale-8b.json`, `h200-scale-1.4b.json`, the parts in
`MEASURED`), and `speed.py`'s Trainer recipe (every review padded to 512) and peftbench (batches of 16
packed, so at most 16 x 512 tokens; `h200-speed-matrix.json`). Then `peftbench plan` over the 8B shape
without a GPU beside the plans made on the H200 (`plans`), and real MiniLM training steps on this CPU,
with and without gradient checkpointing, beside the estimate (`cpu_steps`: no GPU measured checkpointing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from peftbench import config  # noqa: E402
from peftbench.estimate import estimate_run  # noqa: E402
from peftbench.runner import Study  # noqa: E402
from scale import METHODS, copy_tokenizer, shape_config  # noqa: E402
from speed import SEED_METHODS, roberta_config  # noqa: E402

MEASURED = {  # shape: the result parts measured at length 512
    "8b": [("h200-scale-8b.json", "micro_2_and_16_at_a9253f3"), ("h200-scale-8b.json", "full_and_budgets")],
    "1.4b": [("h200-scale-1.4b.json", "all_methods_micro_2_and_16_at_a9253f3")],
    "roberta": [("h200-speed-matrix.json", None)],
}


def measured(shape: str) -> dict:
    """(method, micro-batch) -> {recipe: (peak allocated MB, peak reserved MB)}, from the committed
    results."""
    out: dict = {}
    for name, part in MEASURED[shape]:
        result = json.loads((HERE / "results" / name).read_text())
        for r in result["parts"][part]["rows"] if part else result["rows"]:
            if (
                r.get("status") == "success"
                and r.get("peak_memory_allocated_mb")
                and r.get("model", shape) == shape
            ):
                key = (r["method"], r.get("micro_batch_size", 16))
                peaks = (r["peak_memory_allocated_mb"], r.get("peak_memory_reserved_mb"))
                out.setdefault(key, {})[r["recipe"]] = peaks
    return out


def config_folder(shape: str, tokenizer: Path, folder: Path) -> Path:
    """A model folder holding only the shape's config.json and the tokenizer: all the estimate reads."""
    (roberta_config(pad=0) if shape == "roberta" else shape_config(shape)).save_pretrained(folder)
    copy_tokenizer(tokenizer, folder)
    return folder


def estimate_rows(shape: str, tokenizer: Path, tmp: Path) -> list[dict]:
    folder = config_folder(shape, tokenizer, tmp / shape)
    base = {"base_dtype": "fp32"} if shape == "roberta" else {}
    raw = {
        "model": str(folder),
        "data": {"path": config.sample_data_path(), "train_size": 64, "test_size": 16},
        "methods": ["lora"],
        "train": {"max_length": 512, **base},
        "device": "cpu",
    }
    study = Study(config.validate(raw), tmp / f"study-{shape}")
    study.out.mkdir()
    study.prepare()
    methods = SEED_METHODS if shape == "roberta" else config.normalise_methods(list(METHODS.values()), [])
    methods = {m["label"]: m for m in (methods.values() if isinstance(methods, dict) else methods)}
    rows = []
    for (method, micro), peaks in sorted(measured(shape).items()):
        spec = study.run_spec(methods[method], 1e-4, 42, "final")
        for recipe, (allocated, reserved) in peaks.items():
            # the Trainer recipe trains in fp32, without autocast; the others under bf16 autocast, measured
            # before bf16 layer norms (`train.layer_norms`, 2026-12-06) with autocast's fp32 ones
            run = spec.with_train(precision="fp32" if recipe == "trainer" else "auto", layer_norms="fp32")
            est = estimate_run(run, 512)[1]
            row = {"shape": shape, "method": method, "micro_batch_size": micro, "recipe": recipe}
            row.update(precision=run.train.precision, estimate_mb=est.allocated(micro, False) / 2**20)
            row.update(measured_mb=allocated, ratio=row["estimate_mb"] / allocated)
            if reserved:
                row.update(
                    estimate_reserved_mb=est.reserved(micro, False) / 2**20, measured_reserved_mb=reserved
                )
                row["ratio_reserved"] = row["estimate_reserved_mb"] / reserved
            rows.append(row)
            print(
                f"{shape:7} {method:6} {micro:3} {recipe:9} allocated: est. {row['estimate_mb']:9,.0f} MB,"
                f" measured {allocated:9,.0f} MB ({row['ratio']:.3f}); reserved "
                f"{row.get('ratio_reserved', float('nan')):.3f}",
                flush=True,
            )
    return rows


PLANS = [  # the GPU plans of the 8B shape: (budget, methods, results file, part)
    ("24GB", ["full", "lora", "qlora", "ia3"], "h200-scale-8b.json", "plan_24GB"),
    ("24GB", ["full", "lora", "qlora", "ia3"], "h200-scale-8b.json", "plan_24GB_at_a9253f3"),
    (
        "80GB",
        [{"name": "full", "label": "full-bf16w", "optimizer": "adamw_bf16"}],
        "h200-bf16-weights.json",
        None,
    ),
]


def gpu_plan(name: str, part: str | None) -> dict:
    """label -> (micro-batch, checkpointing) as `peftbench plan` chose them on the H200."""
    result = json.loads((HERE / "results" / name).read_text())["parts"]
    rows = (
        result[part]["plans"]["8b"]["plan"]["rows"]
        if part
        else result["8b_full_fine_tuning_under_80gb_at_a5e7513"]["plan_rows"]
    )
    return {r["label"]: (r.get("micro_batch_size"), r.get("gradient_checkpointing")) for r in rows}


def plan_rows(tokenizer: Path, tmp: Path) -> list[dict]:
    """`peftbench plan` over the 8B shape's config on this machine (no GPU: the estimate), beside the
    micro-batches the same plans chose on the H200."""
    folder = config_folder("8b", tokenizer, tmp / "plan-8b")
    rows = []
    for k, (budget, methods, name, part) in enumerate(PLANS):
        raw = {
            "model": str(folder),
            "data": {"path": config.sample_data_path(), "train_size": 160, "test_size": 16},
            "methods": methods,
            "train": {"max_length": 512},
            "device": "cpu",
            "gpu_memory": budget,
        }
        gpu = gpu_plan(name, part)
        for r in Study(config.validate(raw), tmp / f"plan-{k}").plan():
            row = {"budget": budget, "label": r["label"], "gpu_plan": part or name}
            row.update(estimate=(r.get("micro_batch_size"), r.get("gradient_checkpointing")))
            row.update(gpu=gpu.get(r["label"]), estimate_reserved_mb=r.get("peak_reserved_mb"))
            row["same_choice"] = row["estimate"] == row["gpu"]
            rows.append(row)
            print(f"plan {budget} {r['label']:10} estimate {row['estimate']}  H200 {row['gpu']}", flush=True)
    return rows


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes alive at once on the CPU: what is `held` before (storage -> bytes) and every
    other storage an operator makes inside, until it is freed. A view of a held tensor (a weight's
    transpose, which a linear layer keeps for the backward pass) is the held storage, not a new one."""

    def __init__(self, held: dict):
        super().__init__()
        self.held, self.live = held, {}
        self.base = self.peak = sum(held.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            key = t.untyped_storage()._cdata if isinstance(t, torch.Tensor) else None
            if key is not None and key not in self.live and key not in self.held:
                self.live[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.base + sum(n for _, n in self.live.values()))
        return out


def held_bytes(model, optimizer) -> dict:
    """Weights, buffers, gradients and optimizer state: storage -> bytes."""
    tensors = [
        *model.parameters(),
        *model.buffers(),
        *(p.grad for p in model.parameters() if p.grad is not None),
    ]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """`F.dropout` as on CUDA: `native_dropout`, which keeps a one-byte mask per element for the backward
    pass, where the CPU's own dropout keeps a noise tensor of the input's dtype."""
    return torch.native_dropout(input, p, training)[0] if training and 0 < p < 1 else input


def cpu_step_rows(tmp: Path, length: int = 256) -> list[dict]:
    """Real MiniLM training steps on this CPU in fp32 (fused AdamW, attention without dropout so that the
    CPU runs its fused kernel, and other dropout keeping CUDA's one-byte masks: `cuda_dropout`), with and
    without gradient checkpointing: the peak of the bytes alive at once in the second step, against the
    estimate. No allocator here: the estimate's 5% for one is left out."""
    from peftbench import models
    from peftbench.train import set_checkpointing

    raw = {
        "model": "minilm",
        "data": {"path": config.sample_data_path(), "train_size": 64, "test_size": 16},
        "methods": ["full", "lora", "ia3"],
        "train": {"max_length": length, "precision": "fp32"},
        "device": "cpu",
    }
    study = Study(config.validate(raw), tmp / "cpu-steps")
    study.out.mkdir()
    study.prepare()
    rows = []
    for spec in study.final_specs({}):
        est = estimate_run(spec, length)[1]
        for micro, ckpt in ((4, False), (16, False), (4, True), (16, True)):
            model, _ = models.build_model(spec, spec.label_names, "cpu", 100)
            for name, m in model.named_modules():
                if name.endswith("attention.self"):
                    m.dropout.p = 0.0
            model.train()
            set_checkpointing(model, ckpt)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
            ids, y = torch.randint(1000, 2000, (micro, length)), torch.zeros(micro, dtype=torch.long)
            for step in range(2):  # the first makes the gradients and optimizer state, held from then on
                tracker = LiveBytes(held_bytes(model, opt))
                with tracker, mock.patch.object(torch.nn.functional, "dropout", cuda_dropout):
                    model(input_ids=ids, labels=y).loss.backward()
                    opt.step()
            row = {"method": spec.method, "micro_batch_size": micro, "gradient_checkpointing": ckpt}
            row.update(estimate_mb=est.allocated(micro, ckpt) / 2**20, measured_mb=tracker.peak / 2**20)
            row["ratio"] = row["estimate_mb"] / row["measured_mb"]
            rows.append(row)
            print(
                f"cpu {spec.method:5} {micro:3} checkpointing {ckpt!s:5} ratio {row['ratio']:.3f}", flush=True
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a folder with MiniLM's tokenizer")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for shape in MEASURED for r in estimate_rows(shape, a.tokenizer, Path(tmp))]
        plans = plan_rows(a.tokenizer, Path(tmp))
        cpu_steps = cpu_step_rows(Path(tmp))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/estimate.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t,
        "rows": rows,
        "plans": plans,
        "cpu_steps": cpu_steps,
    }
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
