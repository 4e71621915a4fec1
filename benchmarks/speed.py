"""Speed: the plain Trainer recipe against peftbench's loop, in one process on one device.

    python benchmarks/speed.py --minilm PATH --data DIR --out benchmarks/results/NAME.json \
        [--models minilm,roberta] [--methods full,lora,qlora,ia3] [--epochs 1] [--train-size 3000]
        [--recipes trainer,peftbench,peftbench+cudagraphs,peftbench+mask2d+profile,...] [--profile-dir DIR]

For each model and method, both recipes train the same model (built by peftbench, so the method is
identical) on the same tokenized IMDb subset with batch 16, lr 2e-5, weight decay 0.01, linear
schedule. (a) "trainer" is the starting study's recipe: transformers' Trainer, fp32, every review
padded to max length (512 unless --max-length). (b) "peftbench" is `train.train_run`: bf16 autocast with
bf16 layer norms, length-bucketed
batches padded to their longest item (rounded to 64 on GPU), fused AdamW, a ready 4D attention mask
where it gives identical logits, and (CUDA) each step's forward and backward replayed from a CUDA graph per
batch shape. Recipe options, joined with "+": eager (no CUDA graphs), compile (torch.compile per bucket
shape), cudagraphs (compile + its CUDA graphs), padN (pad to multiples of N), mask2d (the plain 2D mask,
i.e. transformers' per-step `mask.all()` sync), nopack / pack (padded batches / packed ones; default: auto),
nogroup (batches not grouped by length), peradd (graphed steps add gradients one parameter at a time,
as autograd does: the code before 2026-12-04), clipzero (graphed steps zero their gradients in a pass of
their own and clip them in another, rather than write over them and clip in the fused AdamW: the code before
commit a29ed6a), castweights (graphed steps let autocast cast every linear
weight and gradient, without bf16 weight copies: the code before commit 778e6f7, 2026-12-05), adamw_bf16
(trained weights in bf16 under optimi's Kahan-summed AdamW, `train.optimizer: adamw_bf16`), fp32norms (layer
norms in fp32 under autocast, as autocast computes them: `train.layer_norms: fp32`, the code before
2026-12-06), blocks (each transformer layer
torch.compile'd in place, CUDA graphs and packing kept: `train.compile: blocks`), profile (a torch.profiler
step profile into --profile-dir). With --epochs > 1 rows also give the last epoch alone
(after warm-up and compilation). The roberta-base-shaped model is built from
RobertaConfig with roberta-base's values and random weights (no download): its accuracy means
nothing, its time and memory are roberta-base's. It is fed the MiniLM tokenizer's ids (all < 30522),
so lengths follow the real IMDb distribution up to the tokenizer difference.

Reported per row: samples/s, real (non-padding) tokens/s, peak GPU memory, and MFU = model FLOPs on
real tokens (6 x non-embedding params + attention) / time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from peftbench import config, data as data_mod, devices, graphs, metrics, models, train  # noqa: E402
from peftbench.runner import Study  # noqa: E402
from peftbench.spec import RunSpec  # noqa: E402

# The starting study's method entries, as the `seed` preset defines them (by label).
SEED_METHODS = {e["label"]: e for e in config.normalise_methods(config.load_preset("seed")["methods"], [])}


def roberta_config(pad: int):
    """roberta-base's config, with `pad` as its padding id."""
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=pad,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )


def roberta_shaped(folder: Path, tokenizer_from: Path | None = None) -> Path:
    """roberta-base's shape with random weights. With `tokenizer_from` (the MiniLM folder) the folder also
    gets that tokenizer, and its pad id, so that `peftbench run --model FOLDER` can use it."""
    from transformers import AutoTokenizer, RobertaModel

    tok = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else None
    torch.manual_seed(0)
    RobertaModel(roberta_config(tok.pad_token_id if tok else 1)).save_pretrained(folder)
    if tok:
        tok.save_pretrained(folder)
    return folder


def spec_for(study: Study, method: str, model_path: str, epochs: int | None, recipe: str) -> RunSpec:
    """The run spec of `recipe`: "peftbench" plus options joined by "+": eager, compile, cudagraphs, blocks,
    padN, mask2d, nopack, pack, nogroup, adamw_bf16, fp32norms.

    `epochs` None keeps the seed protocol's own (5, 3 for LoRA)."""
    spec = study.run_spec(SEED_METHODS[method], 2e-5, 42, "final")
    opts = recipe.split("+")[1:]
    pads = [int(o[3:]) for o in opts if o.startswith("pad")]
    spec = dataclasses.replace(spec, model_path=model_path, evaluate_test=False).with_train(
        epochs=epochs or spec.train.epochs,
        compile=next((o for o in ("cudagraphs", "blocks") if o in opts), "compile" in opts),
        learning_rate=2e-5,
        cuda_graphs="eager" not in opts,
        packing=False if "nopack" in opts else ("pack" in opts or "auto"),
        group_by_length="nogroup" not in opts,
        pad_to_multiple_of=pads[-1] if pads else spec.train.pad_to_multiple_of,
        optimizer="adamw_bf16" if "adamw_bf16" in opts else spec.train.optimizer,
        layer_norms="fp32" if "fp32norms" in opts else spec.train.layer_norms,
    )
    return spec.with_runtime(checkpoint=False).planned()


def peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def reset() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_trainer(
    spec: RunSpec, tok: data_mod.Tokenized, pad_id: int, max_len: int, evaluate: bool = False, seed: int = 42
) -> dict:
    """The Trainer recipe. With `evaluate`, also scores the test set (Trainer.predict, padded like training)
    and reports `total_seconds` from loading the model to the test predictions. `seed` seeds the new head's
    initialisation and the Trainer (data order, dropout)."""
    from transformers import Trainer, TrainingArguments

    reset()
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model, _ = models.build_model(spec, tok.label_names, spec.runtime.device, 1)

    class Padded(torch.utils.data.Dataset):  # the study's recipe: every review padded to max_length
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(tok.ids[self.split])

        def __getitem__(self, i):
            ids = np.full(max_len, pad_id, dtype=np.int64)
            seq = tok.ids[self.split][i][:max_len]
            ids[: len(seq)] = seq
            mask = (np.arange(max_len) < len(seq)).astype(np.int64)
            return {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(mask),
                "labels": int(tok.labels[self.split][i]),
            }

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=16,
            learning_rate=2e-5,
            weight_decay=0.01,
            num_train_epochs=spec.train.epochs,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Padded("train"))
        t0 = time.perf_counter()
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        out = {"train_seconds": secs, "peak_memory_allocated_mb": peak_mb()}
        if evaluate:
            pred = trainer.predict(Padded("test"))
            out["test_accuracy"] = float((pred.predictions.argmax(-1) == tok.labels["test"]).mean())
            out["total_seconds"] = time.perf_counter() - t_start
    del trainer, model
    return out


def zeroing_between_steps():
    """Graphed steps that add their gradients into zeroed ones rather than write over the last step's."""
    init = graphs.StepGraphs.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.overwrites = False

    return mock.patch.object(graphs.StepGraphs, "__init__", patched)


def run_peftbench(spec: RunSpec, tok: data_mod.Tokenized, recipe: str, profile: Path | None) -> dict:
    """Train with train.train_run. `+mask2d` forces the plain 2D mask; `+profile` writes a step profile."""
    reset()
    spec = spec.with_runtime(profile=bool(profile))
    if "+mask2d" in recipe:
        spec = spec.with_train(attention_mask="2d")
    patches = contextlib.ExitStack()
    if "+peradd" in recipe:  # the graphed step as before 2026-12-04: autograd adds gradients one by one
        patches.enter_context(
            mock.patch.object(
                graphs, "backward_adding_in_few_kernels", lambda loss, *_, **__: loss.backward()
            )
        )
    if "+castweights" in recipe:  # autocast casts each weight and gradient, as before bf16 weight copies
        patches.enter_context(
            mock.patch.object(graphs, "weight_copies", lambda *_: (None, "off: +castweights"))
        )
    if "+clipzero" in recipe:  # a pass zeroing the gradients and one clipping them: before commit a29ed6a
        patches.enter_context(mock.patch.object(graphs, "folds_clipping", lambda _: False))
    if "+clipzero" in recipe or "+peradd" in recipe:
        patches.enter_context(zeroing_between_steps())
    with tempfile.TemporaryDirectory() as tmp, patches:
        res = train.train_run(spec, tok, Path(tmp), progress=False)
        if profile and (Path(tmp) / "profile.json").exists():
            profile.write_text((Path(tmp) / "profile.json").read_text())
    m, hist = res["metrics"], res["history"]
    out = {
        "train_seconds": m["train_seconds"],
        "peak_memory_allocated_mb": m["peak_memory_allocated_mb"],
        "validation_accuracy": m["validation_accuracy"],
        "attention_mask": m.get("attention_mask"),
        "packing": m.get("packing"),
        "layer_norms": m.get("layer_norms"),
        "train_loss": [h["train_loss"] for h in hist],
        "pad_to_multiple_of": m.get("pad_to_multiple_of"),
        "compile": m.get("compile"),
        "cuda_graphs": m.get("cuda_graphs"),
        "first_epoch_seconds": hist[0]["epoch_seconds"],
    }
    if len(hist) > 1:  # the last epoch alone: throughput after warm-up and compilation
        out["last_epoch_seconds"] = hist[-1]["epoch_seconds"]
    if profile and profile.exists():
        prof = json.loads(profile.read_text())
        out["profile"] = {
            k: prof[k]
            for k in (
                "wall_ms_per_step",
                "gpu_kernel_ms_per_step",
                "gpu_busy_fraction",
                "host_sync_like_calls_per_step",
                "gpu_kernels_per_step",
                "gpu_kernel_ms_per_step_by_kind",
            )
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="minilm,roberta")
    ap.add_argument("--methods", default="full,lora,qlora,ia3")
    ap.add_argument("--recipes", default="trainer,peftbench")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--profile-dir", default=None, help="step profiles of '+profile' recipes go here")
    a = ap.parse_args()
    os.environ.setdefault("PEFTBENCH_PROGRESS", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = devices.peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    rows = []
    work = Path(tempfile.mkdtemp(prefix="speed-"))  # studies and the roberta-shaped model (0.5 GB)
    atexit.register(shutil.rmtree, work, True)
    for model_name in a.models.split(","):
        path = a.minilm if model_name == "minilm" else str(roberta_shaped(work / "roberta"))
        raw = {
            "model": a.minilm,
            "data": {"path": a.data, "train_size": a.train_size, "validation_size": 200, "test_size": 200},
            "methods": ["full"],
            "train": {
                "max_length": a.max_length,
                "batch_size": 16,
                "learning_rate": 2e-5,
                "weight_decay": 0.01,
                "warmup_ratio": 0.0,
            },
            "device": device,
        }
        study = Study(config.validate(raw), work / f"study-{model_name}")
        study.out.mkdir(parents=True, exist_ok=True)
        study.prepare()  # tokenizes once with MiniLM's tokenizer
        tok = data_mod.Tokenized.load(study.tok_file)
        mconf = models.load_config(path)
        lengths = tok.lengths("train")
        real_tokens = int(lengths.sum()) * a.epochs
        flops = metrics.model_flops_per_token(mconf, float(lengths.mean())) * real_tokens
        for method in a.methods.split(","):
            for recipe in [r for r in a.recipes.split(",") if r]:
                spec = spec_for(study, method, path, a.epochs, recipe.replace("+profile", ""))
                pad_id = 1 if model_name == "roberta" else study.pad_token_id
                spec = dataclasses.replace(spec, pad_token_id=pad_id).planned()
                profile = None
                if "+profile" in recipe and a.profile_dir:
                    Path(a.profile_dir).mkdir(parents=True, exist_ok=True)
                    profile = Path(a.profile_dir) / f"{model_name}-{method}-{recipe.replace('+', '_')}.json"
                try:
                    if recipe == "trainer":
                        r = run_trainer(spec, tok, spec.pad_token_id, a.max_length)
                    else:
                        r = run_peftbench(spec, tok, recipe, profile)
                    status = "success"
                except Exception as e:  # a row that failed is a result too
                    r, status = (
                        {"train_seconds": None, "error": f"{type(e).__name__}: {str(e)[:200]}"},
                        "failed",
                    )
                secs = r.get("train_seconds")
                row = {
                    "model": model_name,
                    "method": method,
                    "recipe": recipe,
                    "status": status,
                    **r,
                    "samples": len(lengths) * a.epochs,
                    "real_tokens": real_tokens,
                    "samples_per_second": len(lengths) * a.epochs / secs if secs else None,
                    "real_tokens_per_second": real_tokens / secs if secs else None,
                    "mfu": flops / secs / peak if (secs and peak) else None,
                    **(
                        {
                            "last_epoch_samples_per_second": len(lengths) / r["last_epoch_seconds"],
                            "last_epoch_mfu": flops / a.epochs / r["last_epoch_seconds"] / peak
                            if peak
                            else None,
                        }
                        if r.get("last_epoch_seconds")
                        else {}
                    ),
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                }
                rows.append(row)
                print(
                    json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                    flush=True,
                )
                # after every row: a cut-off run keeps its rows
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(
                    json.dumps({"rows": rows, "torch": torch.__version__, "argv": sys.argv[1:]}, indent=1)
                )


if __name__ == "__main__":
    main()
