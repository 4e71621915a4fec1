"""Reload a trained run with plain transformers/peft and classify texts (`peftbench predict`).

The same function serves the reload check every run does after saving, so a saved adapter that
predicts differently from the model that was trained is caught when it is made, not in production.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import methods as registry
from .errors import UserError
from .spec import RunSpec


def _read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{run_dir} is not a run folder (no result.json); give a folder under STUDY/runs/"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt; rerun the study to redo this run") from None
    if result.get("status") != "success":
        raise UserError(
            f"run {result.get('run_id')} has status {result.get('status')}; only successful runs predict"
        )
    return result


def load_trained(run_dir: Path, spec: RunSpec | None = None, device: str = "cpu"):
    """The trained classifier of `run_dir`: base + adapter through `peft`, or the saved model."""
    run_dir = Path(run_dir)
    if spec is None:
        result = _read_run(run_dir)
        spec = RunSpec.from_dict(result["config"])
        if spec.train.layer_norms == "auto":  # as the run chose
            from .norms import chosen

            spec = spec.with_train(layer_norms=chosen(result.get("metrics", {}).get("layer_norms")))
    method = registry.get(spec.method)
    try:
        return _load(run_dir, spec, method, device)
    except UserError:
        raise
    except Exception as e:  # a missing or damaged artefact, a base model that moved, ...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(
            f"run {run_dir} cannot be reloaded ({type(e).__name__}: {first}); check that its "
            f"adapter/ or model/ folder is intact and that the base model {spec.model_path} is "
            "still there"
        ) from None


def _load(run_dir: Path, spec: RunSpec, method, device: str):
    if method.kind == "tfidf":
        import joblib

        return joblib.load(run_dir / "model" / "tfidf_logreg.joblib")
    from .devices import autocast_dtype
    from .norms import bf16_layer_norms

    amp = autocast_dtype(spec.train.precision, device)  # the base in the dtype it was trained over
    if method.kind == "peft":
        from ._peft import without_bitsandbytes  # first: it imports peft without bitsandbytes
        from peft import PeftModel  # noqa: I001

        from .models import load_base, trained_dtype

        base, _ = load_base(spec, spec.label_names, device, amp)
        with without_bitsandbytes(hide=not method.quantize):
            model = PeftModel.from_pretrained(base, run_dir / "adapter", is_trainable=False)
        model.to(device) if not method.quantize else None
        _adapter_in(model, trained_dtype(spec))
    else:
        from transformers import AutoModelForSequenceClassification

        from .models import add_token_types, frozen_dtype

        # straight onto a GPU, shard by shard: no fp32 copy of the whole model in host memory on the way
        where = {"device_map": {"": device}} if device.startswith("cuda") else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            run_dir / "model", dtype=frozen_dtype(spec, device, amp), use_safetensors=True, **where
        ).to(device)
        _widen_as_saved(model, run_dir / "model", device)
        add_token_types(model, spec)
    if spec.train.layer_norms == "bf16":  # as trained (`load_trained` and `Recipe.as_trained` resolve auto)
        bf16_layer_norms(model)
    model.eval()
    return model


def _widen_as_saved(model, folder: Path, device: str) -> None:
    """The weights saved in a wider dtype than the model loaded in, as saved: BitFit's and a head-only run's
    trained modules (fp32) over a frozen bf16 base. The model then computes as it did in training."""
    from safetensors import safe_open

    width = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
    params = dict(model.named_parameters())
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                p = params.get(key)
                if p is not None and width.get(f.get_slice(key).get_dtype(), 0) > p.element_size():
                    p.data = f.get_tensor(key)


def _adapter_in(model, dtype) -> None:
    """The adapter's weights (and its head, `modules_to_save`) in the dtype they trained in: PEFT loads them
    in fp32 over a bf16 base, and bf16-trained weights (`optimizer: adamw_bf16`) must compute as trained."""
    import torch

    if dtype == torch.float32:
        return
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    for pname, p in model.named_parameters():
        if f".{name}." in pname or pname.endswith(f".{name}"):
            p.data = p.data.to(dtype)


def predict_texts(run_dir: Path, texts: list[str], device: str = "cpu") -> list[dict]:
    """Per text (a sentence pair: FIRST<TAB>SECOND) what the run predicts: the class and each class's
    probability; the score; or the set of labels and each label's probability."""
    spec, logits = text_logits(run_dir, texts, device)
    return [{"text": t, **row} for t, row in zip(texts, readable_outputs(spec, logits))]


def text_logits(run_dir: Path, texts: list[str], device: str = "cpu") -> tuple[RunSpec, np.ndarray]:
    """The run's spec and its logits for `texts`, as `predict_texts` reads them."""
    from .data import PAIR, is_pair

    result = _read_run(run_dir)
    spec = RunSpec.from_dict(result["config"])
    pair = is_pair(spec.data)
    if pair and not all("\t" in t for t in texts):
        raise UserError(
            "this run was trained on sentence pairs; give each text as FIRST<TAB>SECOND "
            "(e.g. $'a man sings\\ta person sings')"
        )
    inputs = [t.replace("\t", PAIR, 1) for t in texts] if pair else texts
    model = load_trained(run_dir, spec=spec, device=device)
    return spec, _logits(model, spec, inputs, pair, device)


def _logits(model, spec: RunSpec, inputs: list[str], pair: bool, device: str) -> np.ndarray:
    from .batches import predict_logits
    from .data import encode
    from .devices import autocast_dtype

    if registry.get(spec.method).kind == "tfidf":
        from .tfidf import tfidf_logits

        return tfidf_logits(model, spec.task, inputs)
    from .models import load_tokenizer

    tok = load_tokenizer(spec.model_path, spec.trust_remote_code)
    ids = [np.asarray(x) for x in encode(tok, inputs, spec.train.max_length, pair)]
    amp = autocast_dtype(spec.train.precision, device)
    return predict_logits(
        model, ids, spec.train.eval_batch_size, device, amp, spec.pad_token_id or 0, spec.effective_max_length
    )


def readable_outputs(spec: RunSpec, logits: np.ndarray) -> list[dict]:
    """{label, probabilities} per text for classes, {score} for regression, {labels, probabilities} for
    multi-label."""
    from .metrics import predict, probabilities

    names, task = spec.label_names, spec.task
    if task == "regression":
        return [{"score": round(float(v), 4)} for v in predict(task, logits)]
    probs = probabilities(task, logits)
    out = []
    for pred, p in zip(predict(task, logits), probs):
        shown = {n: round(float(x), 4) for n, x in zip(names, p)}
        if task == "multi_label":
            out.append({"labels": [n for n, f in zip(names, pred) if f], "probabilities": shown})
        else:
            out.append({"label": names[int(pred)], "probabilities": shown})
    return out
