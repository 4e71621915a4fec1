"""The method registry: the one place that lists every fine-tuning method peftbench knows.

A PEFT method that needs no special handling is one `Method(...)` entry below: its PEFT config
class, its default options and its default learning rate with the source of that number. Target
modules are given as *roles* (q, k, v, o, ffn_in, ffn_out) that `ARCH_ROLES` translates per
architecture, so one entry serves BERT, RoBERTa, DeBERTa, ModernBERT and Llama-style decoders.

What a method does differently is said on its entry: `kind` (how `models.build_model` applies it),
`quantize` (QLoRA is LoRA with a 4-bit base), `prompt` (soft prompts and prefixes take context positions;
prefixes also keep the run off CUDA graphs) and `after_step` (AdaLoRA's rank reallocation after each
step). Two behaviours follow the PEFT config a model carries, so that evaluation and `predict` find them
on any reloaded model too: prefix tuning's forward (`batches.model_forward`: transformers 5.2x renamed the
cache argument PEFT's forward looks for) and PiSSA-style initialisations (`artefacts.save_model`: saved as
a plain LoRA adapter on the original base).
  full       every weight trains
  peft       a PEFT adapter (+ `quantize=True`: QLoRA, a 4-bit NF4 base from bitsandbytes)
  head       frozen encoder, only the classifier (and newly initialised modules) train
  bitfit     biases + classifier train
  tfidf      no transformer at all: TF-IDF + logistic regression (scikit-learn), the floor to beat
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out", "norm")

# Module-name patterns (regex fragments matched at the end of a module's dotted name) per role.
_BERT_LIKE = {
    "q": r"query",
    "k": r"key",
    "v": r"value",
    "o": r"attention\.output\.dense",
    "ffn_in": r"intermediate\.dense",
    "ffn_out": r"layer\.\d+\.output\.dense",
    "norm": r"LayerNorm",
}
_LLAMA_LIKE = {
    "q": r"q_proj",
    "k": r"k_proj",
    "v": r"v_proj",
    "o": r"o_proj",
    "ffn_in": r"(up_proj|gate_proj)",
    "ffn_out": r"down_proj",
    "norm": r"(input_layernorm|post_attention_layernorm)",
}
ARCH_ROLES: dict[str, dict[str, str]] = {
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie")},
    "deberta-v2": {**_BERT_LIKE, "q": r"query_proj", "k": r"key_proj", "v": r"value_proj"},
    "deberta": {**_BERT_LIKE, "q": r"in_proj", "k": r"in_proj", "v": r"in_proj"},
    "distilbert": {
        "q": r"q_lin",
        "k": r"k_lin",
        "v": r"v_lin",
        "o": r"out_lin",
        "ffn_in": r"ffn\.lin1",
        "ffn_out": r"ffn\.lin2",
        "norm": r"(sa_layer_norm|output_layer_norm)",
    },
    "modernbert": {
        "q": r"Wqkv",
        "k": r"Wqkv",
        "v": r"Wqkv",
        "o": r"attn\.Wo",
        "ffn_in": r"mlp\.Wi",
        "ffn_out": r"mlp\.Wo",
        # layer 0's attn_norm is an Identity (the embedding norm serves): not a norm to tune
        "norm": r"(layers\.[1-9]\d*\.attn_norm|mlp_norm|final_norm)",
    },
    **{
        t: _LLAMA_LIKE
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
}

# Modules that form the classification head, by the names transformers uses.
HEAD_MODULES = ("classifier", "score", "pre_classifier", "pooler")


def targets_regex(model_type: str, roles: list[str]) -> str:
    """Translate roles (e.g. ["q", "v"]) into one regex PEFT matches against full module names."""
    table = ARCH_ROLES.get(model_type)
    if table is None:
        raise UserError(
            f"no default target modules for model type '{model_type}'; "
            f"give the method a `target_modules` option (module names, a regex, or 'all-linear')"
        )
    alts = sorted({table[r] for r in roles})
    return r".*\.(" + "|".join(alts) + r")$"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # full | peft | head | bitfit | tfidf
    learning_rate: float | None  # the method's literature default (None: no gradient training)
    source: str  # where the defaults come from
    description: str
    peft_config: str | None = None  # class name in `peft`, e.g. "LoraConfig"
    options: dict = field(default_factory=dict)  # default PEFT options; roles under "targets"
    quantize: bool = False  # 4-bit NF4 base (QLoRA is LoRA with quantize=True)
    prompt: str | None = (
        None  # "soft": virtual tokens before the input; "prefix": key/value prefixes per layer
    )
    after_step: Callable | None = None  # called as after_step(model, step) after each optimizer step

    @property
    def takes_positions(self) -> bool:
        """Soft prompts and prefixes take positions of the model's context."""
        return self.prompt is not None

    @property
    def has_targets(self) -> bool:
        """Whether the method adapts target modules (soft prompts adapt none)."""
        return self.kind == "peft" and self.prompt != "soft"

    @property
    def graph_blocker(self) -> str | None:
        """Why this method's training steps cannot be replayed from CUDA graphs (None: they can)."""
        if self.prompt == "prefix":
            return "prefix tuning"
        if self.after_step is not None:
            return f"per-step hook ({self.name})"
        return None


def _reallocate_ranks(model, step: int) -> None:
    """AdaLoRA reads the gradients to reallocate ranks: after the optimizer step, before zero_grad."""
    model.base_model.update_and_allocate(step)


_LORA_SRC = "Hu et al. 2021 (LoRA), Table 9: roberta-base, r=8, alpha=8, lr 4e-4..5e-4, batch 16"
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "full",
            "full",
            2e-5,
            "Liu et al. 2019 (RoBERTa) fine-tuning grid 1e-5..3e-5",
            "full fine-tuning: every weight trains",
        ),
        Method(
            "lora",
            "peft",
            5e-4,
            _LORA_SRC,
            "LoRA: low-rank updates on the attention projections",
            "LoraConfig",
            {"r": 8, "lora_alpha": 8, "lora_dropout": 0.1, "targets": ["q", "v"]},
        ),
        Method(
            "qlora",
            "peft",
            5e-4,
            "Dettmers et al. 2023 (QLoRA): NF4 + double quantization, bf16 compute; lr as LoRA on a "
            "base-size "
            "model (the paper's 2e-4 is for 7B+ decoders)",
            "QLoRA: LoRA on a 4-bit NF4 base (bitsandbytes)",
            "LoraConfig",
            {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "targets": ["q", "v"]},
            quantize=True,
        ),
        Method(
            "ia3",
            "peft",
            3e-3,
            "Liu et al. 2022 (T-Few / IA3): lr 3e-3",
            "IA3: learned rescaling of keys, values and FFN activations",
            "IA3Config",
            {"targets": ["k", "v", "ffn_out"], "feedforward": ["ffn_out"]},
        ),
        Method(
            "dora",
            "peft",
            5e-4,
            "Liu et al. 2024 (DoRA): LoRA's rates; " + _LORA_SRC,
            "DoRA: weight-decomposed LoRA",
            "LoraConfig",
            {"r": 8, "lora_alpha": 8, "lora_dropout": 0.1, "targets": ["q", "v"], "use_dora": True},
        ),
        Method(
            "rslora",
            "peft",
            5e-4,
            "Kalajdzievski 2023 (rsLoRA): alpha/sqrt(r) scaling; LoRA's rates",
            "rank-stabilised LoRA",
            "LoraConfig",
            {"r": 8, "lora_alpha": 8, "lora_dropout": 0.1, "targets": ["q", "v"], "use_rslora": True},
        ),
        Method(
            "lora_all",
            "peft",
            3e-4,
            "Dettmers et al. 2023 (QLoRA): LoRA on all linear layers matches full fine-tuning; lr below "
            "LoRA's "
            "q,v rate since 3x more layers adapt",
            "LoRA on every linear layer of the encoder",
            "LoraConfig",
            {
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.1,
                "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"],
            },
        ),
        Method(
            "pissa",
            "peft",
            5e-4,
            "Meng et al. 2024 (PiSSA): LoRA's hyper-parameters, adapter initialised from the principal "
            "singular "
            "components (fast SVD, 4 iterations); " + _LORA_SRC,
            "PiSSA: LoRA initialised from the weights' principal components; saved as a plain LoRA adapter",
            "LoraConfig",
            {
                "r": 8,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "targets": ["q", "v"],
                "init_lora_weights": "pissa_niter_4",
            },
        ),
        Method(
            "adalora",
            "peft",
            5e-4,
            "Zhang et al. 2023 (AdaLoRA): GLUE lr 5e-4..1e-3, budget r 8 -> 4",
            "AdaLoRA: LoRA whose rank budget is reallocated during training",
            "AdaLoraConfig",
            {"init_r": 8, "target_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "targets": ["q", "v"]},
            after_step=_reallocate_ranks,
        ),
        Method(
            "vera",
            "peft",
            4e-3,
            "Kopiczko et al. 2024 (VeRA): roberta-base lr 4e-3 at r=1024; r=256 here to keep it light",
            "VeRA: shared frozen random matrices, trained scaling vectors",
            "VeraConfig",
            {"r": 256, "vera_dropout": 0.1, "targets": ["q", "v"]},
        ),
        Method(
            "loha",
            "peft",
            5e-4,
            "no classification-specific value published; LoRA's rate (LyCORIS guidance)",
            "LoHa: low-rank Hadamard product",
            "LoHaConfig",
            {"r": 8, "alpha": 8, "module_dropout": 0.0, "targets": ["q", "v"]},
        ),
        Method(
            "lokr",
            "peft",
            5e-4,
            "no classification-specific value published; LoRA's rate (LyCORIS guidance)",
            "LoKr: low-rank Kronecker product",
            "LoKrConfig",
            {"r": 8, "alpha": 8, "targets": ["q", "v"]},
        ),
        Method(
            "oft",
            "peft",
            5e-4,
            "Qiu et al. 2023 (OFT) / Liu et al. 2024 (BOFT) GLUE rates 3e-4..8e-4",
            "OFT: orthogonal fine-tuning with block-diagonal rotations",
            "OFTConfig",
            {"r": 0, "oft_block_size": 32, "targets": ["q", "v"]},
        ),
        Method(
            "prompt_tuning",
            "peft",
            3e-2,
            "Lester et al. 2021 (prompt tuning) use 0.3 with Adafactor; 3e-2 is the AdamW-scale rate of "
            "PEFT's "
            "sequence-classification example",
            "prompt tuning: 20 trained soft-prompt tokens",
            "PromptTuningConfig",
            {"num_virtual_tokens": 20},
            prompt="soft",
        ),
        Method(
            "p_tuning",
            "peft",
            1e-3,
            "Liu et al. 2021 (P-tuning) / PEFT's P-tuning example: lr 1e-3",
            "P-tuning: soft prompts produced by a small MLP encoder",
            "PromptEncoderConfig",
            {"num_virtual_tokens": 20, "encoder_hidden_size": 128},
            prompt="soft",
        ),
        Method(
            "prefix_tuning",
            "peft",
            1e-2,
            "Li & Liang 2021 (prefix tuning); Liu et al. 2022 (P-tuning v2) on RoBERTa/GLUE: prefix length "
            "20, "
            "lr 5e-3..1e-2, no reparameterisation",
            "prefix tuning: 20 trained key/value prefixes in every layer",
            "PrefixTuningConfig",
            {"num_virtual_tokens": 20},
            prompt="prefix",
        ),
        Method(
            "ln_tuning",
            "peft",
            1e-3,
            "Zhao et al. 2024 (LN tuning); lr as BitFit's",
            "LayerNorm tuning: only LayerNorm weights (and the head) train",
            "LNTuningConfig",
            {"targets": ["norm"]},
        ),
        Method(
            "bitfit",
            "bitfit",
            1e-3,
            "Ben Zaken et al. 2022 (BitFit): best lr in {1e-4, 4e-4, 7e-4, 1e-3}",
            "BitFit: only biases and the classifier head train",
        ),
        Method(
            "head",
            "head",
            1e-3,
            "linear probing practice (e.g. Kumar et al. 2022): lr 1e-3 with AdamW",
            "head only: frozen encoder, only the classifier head trains",
        ),
        Method(
            "tfidf",
            "tfidf",
            None,
            "scikit-learn TF-IDF (1-2 grams) + logistic regression, C=1: the classical floor",
            "TF-IDF + logistic regression, no transformer at all",
        ),
    ]
}

# Option keys a method entry may carry that are training settings, not method settings.
TRAIN_OVERRIDES = {
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "warmup_ratio",
    "scheduler",
    "max_grad_norm",
    "select_best_epoch",
    "head_learning_rate",
    "optimizer",
    "gradient_checkpointing",
    "base_dtype",
    "layer_norms",
}
# Option keys every PEFT method accepts besides its config class's own fields.
EXTRA_PEFT_KEYS = {"targets", "feedforward", "label"}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown method '{name}'{hint}; `peftbench methods` lists them") from None


def peft_config_fields(method: Method) -> set[str]:
    import dataclasses

    from . import _peft  # noqa: F401  (without bitsandbytes' import)
    import peft

    cls = getattr(peft, method.peft_config)
    return {f.name for f in dataclasses.fields(cls)}


def allowed_options(method: Method, given=()) -> set[str]:
    """The option keys `method` accepts. The PEFT config class's fields are read (which imports peft: 5-18 s
    in a fresh process) only when a `given` key is not one the registry already knows."""
    keys = set(TRAIN_OVERRIDES) | {"label"}
    if method.kind == "peft":
        keys |= set(method.options) | EXTRA_PEFT_KEYS
        if not set(given) <= keys:
            keys |= peft_config_fields(method)
    if method.kind == "tfidf":
        keys |= {"C", "max_features", "ngram_max"}
    return keys


def split_options(method: Method, options: dict) -> tuple[dict, dict]:
    """Split a method entry's options into (method options incl. defaults, training overrides)."""
    merged = {
        **method.options,
        **{k: v for k, v in options.items() if k not in TRAIN_OVERRIDES and k != "label"},
    }
    train = {k: v for k, v in options.items() if k in TRAIN_OVERRIDES}
    return merged, train


def build_peft_config(method: Method, options: dict, model_type: str, total_steps: int):
    """The PEFT config object for `method` with `options` (roles resolved for `model_type`)."""
    import peft

    opts = dict(options)
    roles = opts.pop("targets", None)
    ff_roles = opts.pop("feedforward", None)
    cls = getattr(peft, method.peft_config)
    if "target_modules" not in opts and roles is not None:
        opts["target_modules"] = targets_regex(model_type, roles)
    if ff_roles is not None and "feedforward_modules" not in opts:
        opts["feedforward_modules"] = targets_regex(model_type, ff_roles)
    if method.peft_config == "AdaLoraConfig":
        opts.setdefault("total_step", total_steps)
        # Reallocate over the middle of training: warm up for 10% of the steps, fix the budget for the last
        # 20%.
        opts.setdefault("tinit", max(1, total_steps // 10))
        opts.setdefault("tfinal", max(1, total_steps // 5))
        opts.setdefault("deltaT", max(1, total_steps // 20))
    return cls(task_type=peft.TaskType.SEQ_CLS, **opts)


def describe() -> list[dict]:
    """Rows for `peftbench methods`."""
    rows = []
    for m in METHODS.values():
        opts = {k: v for k, v in m.options.items()}
        rows.append(
            {
                "name": m.name,
                "kind": m.kind + ("+4bit" if m.quantize else ""),
                "learning_rate": m.learning_rate,
                "options": opts,
                "description": m.description,
                "source": m.source,
            }
        )
    return rows


def safe_label(text: str) -> str:
    """A run-name-safe version of a method label (letters, digits, '-', '_', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "method"
