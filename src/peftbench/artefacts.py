"""What a run leaves on disk: its epoch checkpoint (to resume), its trained artefact (a PEFT adapter or a
model folder, safetensors), and the reload check that the artefact predicts what the trained model did."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import methods as registry
from .batches import active_peft_config
from .spec import RunSpec


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def trainable_state(model, on_device: bool = False) -> dict:
    """Copies of the trainable parameters: in host memory, or (a sharded run's own shards) on the device.
    A full copy on the device first would need the weights' size again under a memory budget."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p.detach().clone() for n, p in params.items()} if on_device else host_copy(params)


def load_trainable(model, state: dict) -> None:
    """Copy `state` into the model's parameters (and buffers), from wherever it is held."""
    import torch

    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write an epoch checkpoint atomically (a reader sees the old one or the new one)."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config_hash: str, device: str) -> dict | None:
    """The checkpoint at `path` if it belongs to this run's config, else None."""
    import torch

    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or corrupt: unpickling, zip and key errors alike
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        print(
            f"peftbench: warning: the checkpoint {path} was damaged ({type(e).__name__}); moved to "
            f"{aside.name}, "
            "the run starts from scratch",
            file=sys.stderr,
        )
        return None
    return ck if isinstance(ck, dict) and ck.get("config_hash") == config_hash else None


def mutated_init(model) -> bool:
    """True for LoRA initialisations that change the base weights (PiSSA, OLoRA, CorDA)."""
    init = getattr(active_peft_config(model), "init_lora_weights", None)
    return isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda"))


# A saved model's safetensors files: at most this size each, as models are published on the Hugging Face Hub
# (transformers' own default, 50 GB, writes a fully fine-tuned 8B model as one 29 GB file).
SHARD_SIZE = "5GB"
# The reload check scores at most this many test items, spread over the split's lengths: an artefact that
# predicts differently does so on any of them, and on an 8B model the whole test split took longer than
# training a short run (benchmarks/results/h200-scale-8b.json).
RELOAD_CHECK_ITEMS = 256


def start_save(model, spec: RunSpec, run_dir: Path) -> Callable[[], str]:
    """Begin saving the trained model; returns the wait, which gives the folder's name. A whole model is
    copied to host memory now and written on a thread, so that what follows on the GPU (the test pass) runs
    while its shards go to disk: writing the 8B shape in fp32 (26.5 GB) is bound by the disk, and
    safetensors writes without holding the GIL. An adapter (megabytes) is saved when waited for."""
    if registry.get(spec.method).kind == "peft":
        return lambda: save_model(model, run_dir)
    state = host_state_dict(model)
    pool = ThreadPoolExecutor(1, thread_name_prefix="peftbench-save")
    future = pool.submit(save_model, model, run_dir, state)
    pool.shutdown(wait=False)
    return future.result


def save_model(model, run_dir: Path, state: dict | None = None) -> str:
    """Save the adapter (PEFT: no `state`) or the whole model from `state`, its weights in host memory (in
    SHARD_SIZE safetensors shards); returns the folder's name. `start_save` decides which."""
    name = "adapter" if state is None else "model"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kw = {} if state is None else {"max_shard_size": SHARD_SIZE, "state_dict": state}
    converted = mutated_init(model)
    if converted:  # PEFT subtracts the initial adapter: a plain LoRA adapter on the original base
        kw["path_initial_model_for_weight_conversion"] = str(run_dir / "adapter-init")
    model.save_pretrained(tmp, safe_serialization=True, **kw)
    if converted:
        _restore_modules_to_save(model, tmp / "adapter_model.safetensors")
    shutil.rmtree(run_dir / "adapter-init", ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return name


def host_copy(tensors: dict, bounce_bytes: int = 2**30) -> dict:
    """Copies of `tensors` in host memory, made without a second copy on the GPU. From a GPU each goes
    through one reused pinned buffer: on an H200 (2026-12-02, the 8B shape in fp32, 26.5 GB) that took
    1.9 s, where `tensor.cpu()` took 17-20 s and pinning a whole copy 12 s."""
    import torch

    on_gpu = [t.numel() * t.element_size() for t in tensors.values() if t.is_cuda]
    # no larger than the largest tensor: a small model does not pin (and keep cached) a whole GiB
    step = max(1, min(bounce_bytes, max(on_gpu, default=0)))
    buf = torch.empty(step, dtype=torch.uint8, pin_memory=True) if on_gpu else None
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if not t.is_cuda:
            out[name] = t.clone()
            continue
        out[name] = host = torch.empty(t.shape, dtype=t.dtype)
        src, dst = t.contiguous().view(-1).view(torch.uint8), host.view(-1).view(torch.uint8)
        for start in range(0, src.numel(), step):
            end = min(src.numel(), start + step)
            buf[: end - start].copy_(src[start:end])
            dst[start:end].copy_(buf[: end - start])
    return out


def host_state_dict(model) -> dict:
    """The model's state dict in host memory, for saving (a model on the CPU: its own tensors)."""
    state = model.state_dict()
    return host_copy(state) if any(t.is_cuda for t in state.values()) else state


def _restore_modules_to_save(model, path: Path) -> None:
    """peft 0.21's PiSSA conversion drops the modules_to_save (the head): put them back."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    converted = load_file(path)
    extra = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model).items()
        if k not in converted and "lora_" not in k
    }
    save_file({**converted, **extra}, path, metadata={"format": "pt"})


def reload_check_batches(batches: list[np.ndarray]) -> list[np.ndarray]:
    """The test pass's batches the reload check scores again, whole (the same rows padded together, so the
    same arithmetic: under bf16, rows padded with others round differently): all of them up to
    RELOAD_CHECK_ITEMS items, else that many items' worth spread evenly over the lengths, the longest and
    the shortest batch included."""
    size = max(len(b) for b in batches) if batches else 1
    keep = max(1, RELOAD_CHECK_ITEMS // size)
    if keep >= len(batches):
        return batches
    return [batches[i] for i in np.unique(np.linspace(0, len(batches) - 1, keep).round().astype(int))]


def verify_reload(spec: RunSpec, run_dir, device: str, logits: np.ndarray, rescore: Callable) -> dict:
    """Reload the saved artefact through the same path as `peftbench predict` and compare it with the trained
    model's test `logits`: `rescore(model)` gives some test items and the reloaded model's logits for them,
    scored as the trained model's were. Predicted classes and label sets must be equal, scores within 1e-3."""
    from .predict import load_trained

    items, again = rescore(load_trained(run_dir, spec=spec, device=device))
    return compare_predictions(spec.task, logits[items], again)


def compare_predictions(task: str, logits: np.ndarray, again: np.ndarray) -> dict:
    """The reload check's verdict on the trained model's `logits` and the reloaded model's `again`."""
    from .metrics import predict

    if task == "regression":
        changed = int((~np.isclose(again[:, 0], logits[:, 0], rtol=1e-3, atol=1e-3)).sum())
    else:
        changed = int((predict(task, again) != predict(task, logits)).reshape(len(logits), -1).any(1).sum())
    return {
        "identical_predictions": changed == 0,
        "changed_predictions": changed,
        "max_abs_logit_diff": float(np.abs(again - logits).max()) if len(again) else 0.0,
        "items_checked": len(logits),
    }


def reload_warning(result: dict) -> str | None:
    """The loud line for a run whose saved artefact does not predict what the trained model did."""
    check = result.get("reload_check") or {}
    if check.get("identical_predictions", True):
        return None
    changed, n = check.get("changed_predictions"), check.get("items_checked")
    # results written before the check counted its items say only that predictions changed
    counted = (
        f"{changed} of {n} reload-check items changed" if n is not None else "reload-check items changed"
    )
    return (
        f"{result['run_id']}: its saved {result.get('artefact') or 'artefact'} does not reproduce its "
        f"predictions ({counted}): do not use it; rerun the run, and report it if it happens again"
    )


def text_sha1(text: str) -> str:
    """The hash a predictions table keys each text by."""
    import hashlib

    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def predictions_frame(base, logits: np.ndarray, label_names: list[str], task: str = "classification"):
    """`base` (one row per text) with the prediction (the class; the score; the list of labels) and, for
    classes and labels, the probability of each (`p_<name>`)."""
    from .metrics import predict, probabilities

    df = base.copy()
    logits = np.asarray(logits, dtype=np.float32)
    preds = predict(task, logits)
    if task == "regression":
        df["prediction"] = preds
        return df
    df["prediction"] = (
        [[n for n, f in zip(label_names, row) if f] for row in preds]
        if task == "multi_label"
        else [label_names[i] for i in preds]
    )
    for name, p in zip(label_names, probabilities(task, logits).T):
        df[f"p_{name}"] = p
    return df


def write_predictions(
    path: Path, rows_file: str | None, logits, label_names: list[str], task: str = "classification"
) -> None:
    """predictions.parquet: one row per test item in the test split's order, with its source row number, the
    hash of its text, its label, the prediction and the probability of each class (columns `p_<class>`)."""
    import pandas as pd

    base = (
        pd.read_parquet(rows_file)
        if rows_file and Path(rows_file).exists()
        else pd.DataFrame({"row": np.arange(len(logits))})
    )
    tmp = path.with_name(f".{path.name}.tmp")
    predictions_frame(base, logits, label_names, task).to_parquet(tmp, index=False)
    os.replace(tmp, path)
