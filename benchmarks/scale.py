"""Scale: decoder classifiers of real 1B-8B shapes, peftbench against a practitioner's plain loop, and the
GPU memory budget, in one process on one GPU.

    python benchmarks/scale.py --tokenizer MINILM_DIR --data DIR --out benchmarks/results/NAME.json \
        [--shapes 1.4b,8b] [--methods full,lora,qlora,ia3] [--micro 2,16] [--budgets lora@24,qlora@16,full@48]
        [--plan-budget 24GB]

Shapes are built from configs with random weights and MiniLM's tokenizer (vocabulary 30,522, pad id 0):
`1.4b` has Qwen2.5-1.5B's blocks (1.36B parameters with this vocabulary), `8b` Llama-3.1-8B's (7.2B);
their memory and speed are real, their accuracy means nothing. `tiny` is a 2-layer shape for the CPU.

Per shape, method and micro-batch, two rows:
- "plain": what a practitioner writes: base in bf16 (`from_pretrained(dtype=bfloat16)`, QLoRA: NF4 4-bit
  with bf16 compute), peft LoRA r16/alpha 32 on q,v (QLoRA the same; IA3 peft's defaults for k, v and the
  FFN output), torch AdamW on the trainable parameters, bf16 autocast, every row padded to the max length,
  an optimizer step per micro-batch; timed over the steps after two warm-up steps.
- "peftbench" (`+pack` / `+nopack`: packed / padded batches, default auto): `train.train_run` on the same
  model folder and method, batch 16 in micro-batches of the
  same size (gradient accumulation), 2 epochs; speed is its second epoch (after warm-up).
Peaks are from a clean baseline in this process: allocated, reserved (what an OOM is decided on) and,
for peftbench, the device's figure (reserved + what the CUDA context holds).
`--budgets METHOD@GB,...` runs peftbench under that budget (capped allocator, micro-batch planned;
`METHOD@GB!`: under the cap without the plan, at micro-batch 1 with gradient checkpointing);
`--plan-budget` times `peftbench plan` over the shape at that budget, in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from peftbench import config, data as data_mod, train  # noqa: E402
from peftbench.devices import is_oom  # noqa: E402
from peftbench.errors import SkipRun  # noqa: E402
from peftbench.runner import Study  # noqa: E402

SHAPES = {
    "8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
    "1.4b": (
        "qwen2",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
    ),
    "tiny": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
    ),
}
METHODS = {  # the same adapters in both recipes
    "full": {"name": "full"},
    "lora": {
        "name": "lora",
        "label": "lora",
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "targets": ["q", "v"],
    },
    "qlora": {
        "name": "qlora",
        "label": "qlora",
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "targets": ["q", "v"],
    },
    "ia3": {"name": "ia3", "label": "ia3"},
}


def shape_config(shape: str):
    """The config of `shape`, with MiniLM's vocabulary and special ids."""
    from transformers import AutoConfig

    kind, sizes = SHAPES[shape]
    return AutoConfig.for_model(
        kind, vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102, **sizes
    )


def copy_tokenizer(tokenizer: Path, folder: Path) -> None:
    """The tokenizer files of the folder `tokenizer` (MiniLM's) into `folder`."""
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)


def build_shape(shape: str, tokenizer: Path, folder: Path, device: str) -> Path:
    """A decoder of `shape` with random weights, saved in bf16 with the tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    copy_tokenizer(tokenizer, folder)
    del model
    return folder


BASELINE = {"reserved": 0}


def reset() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        BASELINE["reserved"] = torch.cuda.memory_reserved()


def peaks() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {
        "baseline_reserved_mb": BASELINE["reserved"] / 2**20,  # what the peaks start from
        "peak_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "peak_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
    }


def where() -> list[str]:
    """The peftbench and benchmark frames of the exception being handled, innermost last."""
    ours = (str(Path(__file__).resolve().parent), str(Path(train.__file__).resolve().parent))
    frames = traceback.extract_tb(sys.exc_info()[2])
    return [
        f"{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in frames
        if str(Path(f.filename).resolve()).startswith(ours)
    ]


def failure(e: Exception) -> dict:
    """A row that did not finish: why (an OOM is a result too), where in peftbench, and the peaks so far."""
    status = "skipped" if isinstance(e, SkipRun) else "oom" if is_oom(e) else "failed"
    return {"status": status, "error": f"{type(e).__name__}: {str(e)[:300]}", "where": where(), **peaks()}


@contextlib.contextmanager
def sdpa_cudnn(enabled: bool):
    """SDPA with or without its cuDNN backend (torch's global switch), put back afterwards."""
    saved = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(saved)


@contextlib.contextmanager
def unplanned():
    """Runs under their budget's cap without its plan, at the least memory peftbench trains in (micro-batch
    1, gradient checkpointing): what shows that a method the plan refuses really runs out of memory."""
    real = train.Recipe._plan_memory

    def least(self) -> bool:
        self.micro, self.checkpointing = 1, True
        return True

    train.Recipe._plan_memory = least
    try:
        yield
    finally:
        train.Recipe._plan_memory = real


def plain_model(folder: Path, method: str, device: str):
    """The practitioner's model: bf16 (or NF4) base straight onto the device, peft on top."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    if method not in ("full", "lora", "qlora", "ia3"):
        raise ValueError(f"the plain loop has no recipe for {method!r} (it has full, lora, qlora, ia3)")
    kw = {"dtype": torch.bfloat16, "num_labels": 2, "device_map": {"": device}}
    if method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForSequenceClassification.from_pretrained(folder, **kw)
    model.config.pad_token_id = 0
    if method == "full":
        return model.float()  # fp32 master weights, bf16 autocast: as peftbench's full fine-tuning
    if method == "ia3":
        cfg = IA3Config(task_type=TaskType.SEQ_CLS)
    else:
        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
        )
    return get_peft_model(model, cfg)


def run_plain(
    folder: Path, method: str, micro: int, tok: data_mod.Tokenized, max_len: int, device: str, steps: int
) -> dict:
    reset()
    model = plain_model(folder, method, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    rng = np.random.default_rng(0)
    times = []
    for step in range(steps + 2):
        rows = rng.choice(len(tok.ids["train"]), micro, replace=False)
        ids = np.zeros((micro, max_len), dtype=np.int64)
        mask = np.zeros((micro, max_len), dtype=np.int64)
        for i, r in enumerate(rows):
            seq = tok.ids["train"][r][:max_len]
            ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        y = torch.from_numpy(tok.labels["train"][rows]).to(device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                labels=y,
            ).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t)
    out = {"samples_per_second": micro * len(times) / sum(times), **peaks()}
    del model, opt
    return out


def run_peftbench(
    study: Study,
    folder: Path,
    method: str,
    micro: int,
    tok: data_mod.Tokenized,
    budget_gb: float | None = None,
    packing: bool | str = "auto",
    graphs: bool = True,
) -> dict:
    reset()
    spec = study.run_spec(config.normalise_methods([METHODS[method]], [])[0], None, 42, "final")
    spec = dataclasses.replace(
        spec,
        learning_rate=1e-4,
        model_path=str(folder),
        evaluate_test=False,
        gpu_memory_bytes=int(budget_gb * 2**30) if budget_gb else None,
    )
    spec = spec.with_train(learning_rate=1e-4, micro_batch_size=micro, packing=packing, cuda_graphs=graphs)
    spec = spec.with_runtime(checkpoint=False, verify_reload=False).planned()
    with tempfile.TemporaryDirectory() as tmp:
        res = train.train_run(spec, tok, Path(tmp), progress=False)
    m, hist = res["metrics"], res["history"]
    keys = (
        "peak_memory_allocated_mb",
        "peak_memory_reserved_mb",
        "peak_device_memory_mb",
        "micro_batch_size",
        "gradient_checkpointing",
        "base_dtype",
        "cuda_graphs",
        "attention_mask",
        "packing",
        "packing_token_saving",
        "model_load_seconds",
        "memory_plan",
        "train_samples_per_second",
        "phase_seconds",
    )
    out = {k: m.get(k) for k in keys}
    out["baseline_reserved_mb"] = BASELINE["reserved"] / 2**20
    out["samples_per_second"] = len(tok.ids["train"]) / hist[-1]["epoch_seconds"]
    if budget_gb and m["peak_device_memory_mb"] is not None:
        out["within_budget"] = m["peak_device_memory_mb"] <= budget_gb * 1024
    return out


def timed_plan(folder: Path, data: str, budget: str, methods: str, out_dir: Path) -> dict:
    """`peftbench plan` in a fresh process, as a user runs it; its table and wall time."""
    cmd = [
        sys.executable,
        "-m",
        "peftbench",
        "plan",
        "--model",
        str(folder),
        "--data",
        data,
        "--methods",
        methods,
        "--gpu-memory",
        budget,
        "--train-size",
        "160",
        "--test-size",
        "16",
        "--max-length",
        "512",
        "--out",
        str(out_dir),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t
    plan = json.loads((out_dir / "plan.json").read_text()) if (out_dir / "plan.json").exists() else None
    return {
        "command": " ".join(cmd[1:]),
        "wall_seconds": wall,
        "returncode": proc.returncode,
        "table": proc.stdout,
        "stderr_tail": proc.stderr[-1500:],
        "plan": plan,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="the MiniLM folder (its tokenizer is used)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shapes", default="1.4b,8b")
    ap.add_argument("--methods", default="full,lora,qlora,ia3")
    ap.add_argument("--micro", default="2,16")
    ap.add_argument(
        "--recipes",
        default="plain,peftbench",
        help="plain, peftbench, peftbench+pack, peftbench+nopack; a -nocudnn suffix runs one with cuDNN "
        "taken out of SDPA's backends, -eager runs peftbench without CUDA graphs",
    )
    ap.add_argument("--repeats", type=int, default=1, help="run the recipes this many times, interleaved")
    ap.add_argument(
        "--budgets",
        default="",
        help="METHOD@GB pairs run under a budget, e.g. lora@24,full@48 (full@16!: unplanned)",
    )
    ap.add_argument("--plan-budget", default=None, help="time `peftbench plan` at this budget, e.g. 24GB")
    ap.add_argument("--train-size", type=int, default=160)
    ap.add_argument("--plain-steps", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--work", type=Path, default=None, help="where the shapes are built (default: a temp dir)"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the built shapes in --work, and reuse them there"
    )
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = a.work or Path(tempfile.mkdtemp())
    result = {
        "torch": torch.__version__,
        "argv": sys.argv[1:],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "rows": [],
        "plans": {},
    }

    def save(row=None):
        if row is not None:
            result["rows"].append(row)
            print(
                json.dumps(
                    {
                        k: (round(v, 2) if isinstance(v, float) else v)
                        for k, v in row.items()
                        if k not in ("memory_plan", "cuda_graphs")
                    }
                ),
                flush=True,
            )
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))

    for shape in a.shapes.split(","):
        t = time.perf_counter()
        folder = work / shape
        if not (a.keep and (folder / "config.json").exists()):
            build_shape(shape, a.tokenizer, folder, device)
        reset()
        result.setdefault("build_seconds", {})[shape] = time.perf_counter() - t
        raw = {
            "model": str(folder),
            "data": {"path": a.data, "train_size": a.train_size, "validation_size": 16, "test_size": 16},
            "methods": ["lora"],
            "train": {"max_length": a.max_length, "batch_size": 16, "epochs": 2, "warmup_ratio": 0.0},
            "device": device,
        }
        study = Study(config.validate(raw), work / f"study-{shape}")
        study.out.mkdir(parents=True, exist_ok=True)
        study.prepare()
        tok = data_mod.Tokenized.load(study.tok_file)
        for method in a.methods.split(","):
            for micro in [int(x) for x in a.micro.split(",") if x]:
                for recipe in [r for r in a.recipes.split(",") if r] * a.repeats:
                    row = {"shape": shape, "method": method, "micro_batch_size": micro, "recipe": recipe}
                    base, _, variant = recipe.partition("-")
                    try:
                        with sdpa_cudnn(variant != "nocudnn"):
                            if base == "plain":
                                row.update(
                                    run_plain(folder, method, micro, tok, a.max_length, device, a.plain_steps)
                                )
                            else:
                                pack = {"peftbench+pack": True, "peftbench+nopack": False}.get(base, "auto")
                                kw = {"packing": pack, "graphs": variant != "eager"}
                                row.update(run_peftbench(study, folder, method, micro, tok, **kw))
                        row["status"] = "success"
                    except Exception as e:
                        row.update(failure(e))
                    save(row)
        for pair in [p for p in a.budgets.split(",") if p]:
            method, gb = pair.split("@")
            forced = gb.endswith("!")
            gb = float(gb.rstrip("!"))
            row = {"shape": shape, "method": method, "recipe": "peftbench", "budget_gb": gb}
            row["plan"] = "skipped: micro-batch 1, checkpointing" if forced else "planned"
            try:
                with unplanned() if forced else contextlib.nullcontext():
                    row.update(run_peftbench(study, folder, method, 16, tok, gb), status="success")
            except Exception as e:
                row.update(failure(e))
            save(row)
        if a.plan_budget:
            result["plans"][shape] = timed_plan(
                folder, a.data, a.plan_budget, a.methods, work / f"plan-{shape}"
            )
            save()
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)  # 16 GB for the 8B shape


if __name__ == "__main__":
    main()
