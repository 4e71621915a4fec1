"""The study file: parsing, validation (one line per problem), defaults, presets and hashing.

A study file is YAML (loaded safely, without aliases or repeated keys: `StrictLoader`):

    model: minilm                 # alias, hub id or local folder
    data: {path: ../shared/data/imdb, text_column: text, label_column: label, train_size: 3000, test_size:
    2000}
    methods: [full, lora, {name: qlora, r: 8}, ia3]
    train: {epochs: 5, batch_size: 16, learning_rate: 2.0e-5, weight_decay: 0.01, max_length: 512}
    seeds: [0, 1, 2]              # or a count
    lr_search: {points: 5, decades: 1.5}

Validation collects every problem before anything is loaded and raises `UserError` with one line each.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import methods as registry
from .errors import UserError
from .spec import Runtime, TrainSettings

DATA_ENV = "PEFTBENCH_DATA"

TRAIN_DEFAULTS: dict[str, Any] = TrainSettings.defaults()  # the `train:` keys, documented in spec.py
DATA_DEFAULTS: dict[str, Any] = {
    "path": None,
    "name": None,
    "config": None,
    "text_column": "text",
    "label_column": "label",  # multi_label: a column of lists or delimited strings, or a list of 0/1 columns
    "label_separator": ",",  # multi_label: what separates the labels in a delimited string
    "separator": " ",
    "train_split": "train",
    "test_split": "test",
    "train_size": None,
    "test_size": None,
    "validation_size": 0.1,
    "seed": 42,
    "allow_overlap": False,  # true: test texts that are also training texts are counted, not refused
    "columns": None,  # names for the columns of a CSV/TSV without a header row
    "label_names": None,  # class names for reports and predict: a list in label order, or {label: name}
}
# The keys a run's Runtime also has take its defaults, so that the two cannot drift apart.
TOP_DEFAULTS: dict[str, Any] = {
    "name": None,
    "description": None,
    "model": None,
    "task": "classification",  # classification, regression or multi_label (metrics.TASK_METRICS)
    "metric": None,  # the primary metric: lr selection, best epoch, verdicts, report; default per task
    "tie_margin": None,  # verdicts: a difference shown within +-this is a tie; metric units, default 0.01
    "seeds": [42],
    "lr_search": False,
    "device": "auto",
    "isolation": Runtime.isolation,
    "parallel": 1,
    "exclusive_finals": True,
    "warm_trials": True,  # lr-search trials of one method share a worker process, model and CUDA graphs
    "mps": False,  # true: runs sharing a GPU run their kernels side by side under NVIDIA MPS (devices.py)
    "executor": Runtime.executor,
    "ray_address": None,
    "ray_cpus_per_run": 1,
    "gpus_per_run": 1,  # > 1: data-parallel over that many GPUs via torchrun (gloo processes on CPU)
    "trust_remote_code": False,
    "allow_pickle": False,
    "report": True,
    "max_oom_retries": Runtime.max_oom_retries,
    # seconds of training between epoch checkpoints (what a killed run resumes from); 0: after every epoch
    "checkpoint_every_seconds": Runtime.checkpoint_every_seconds,
    # None, tensorboard or mlflow: per-step loss, lr, throughput, memory (extra: tracking), every
    # `tracking_every` steps (each logged point costs one host synchronisation)
    "tracking": Runtime.tracking,
    "tracking_every": Runtime.tracking_every,
    "gpu_memory": None,  # a budget such as 24GB: each run is capped to it and picks its micro-batch to fit
    "profile": Runtime.profile,  # true: a torch.profiler step profile in each run's profile.json
}
# seed: the trials' seed (default the study's first); seeds: how many seeds each trial rate runs (selection on
# their mean validation accuracy, so that one seed's luck does not pick the rate).
# schedule: grid (every rate, all epochs) or halving (successive halving: every rate for `grace_epochs`,
# then the best 1/reduction_factor go on, at epochs grace x reduction_factor^k, the trials' lr schedule
# spanning the deciding rung's epochs; see runner.halving_rungs)
LR_SEARCH_DEFAULTS = {
    "points": 5,
    "decades": 1.5,
    "seed": None,
    "seeds": 1,
    "schedule": "grid",
    "reduction_factor": 2,
    "grace_epochs": 1,
}
MAX_DECADES = 6  # a grid wider than a million-fold round its default rounds to 0 or overflows
MAX_LR_POINTS = 50
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit", "paged_adamw_8bit")
MASK_MODES = ("auto", "2d", "4d-bidirectional", "4d-causal")
# Keys whose values YAML reads as strings when written as 2e-5 (YAML 1.1 wants 2.0e-5): read as numbers.
NUMERIC_TRAIN_KEYS = ("learning_rate", "head_learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unknown(section: str, key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"{section}.{key}" if section else str(key)
    if section.startswith("methods[") and len(known) > 20:  # a PEFT config has dozens of fields: not all
        return f"{where}: unknown key{hint}; `peftbench methods` shows each method's options"
    return f"{where}: unknown key{hint}; allowed: {', '.join(sorted(known))}"


def _numbers_from_strings(train: dict) -> None:
    for key in NUMERIC_TRAIN_KEYS:
        if isinstance(train.get(key), str):
            try:
                train[key] = float(train[key])
            except ValueError:
                pass


def _check_train(section: str, train: dict, problems: list[str]) -> None:
    _numbers_from_strings(train)

    def need(key, ok, what):
        if key in train and train[key] is not None and not ok(train[key]):
            problems.append(f"{section}.{key}: must be {what}, got {train[key]!r}")

    need("epochs", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("batch_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("micro_batch_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("pad_to_multiple_of", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("eval_batch_size", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("max_length", lambda v: _is_int(v) and v >= 8, "an integer >= 8")
    need("learning_rate", lambda v: _is_num(v) and v > 0, "a positive number")
    need("head_learning_rate", lambda v: _is_num(v) and v > 0, "a positive number")
    need("weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    need("warmup_ratio", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    need("max_grad_norm", lambda v: _is_num(v) and v > 0, "a positive number (or null for no clipping)")
    need("scheduler", lambda v: v in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}")
    need("precision", lambda v: v in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16")
    need("base_dtype", lambda v: v in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16")
    need("gradient_checkpointing", lambda v: v in (True, False, "auto"), "true, false or auto")
    need("packing", lambda v: v in (True, False, "auto"), "true, false or auto")
    need("layer_norms", lambda v: v in ("auto", "bf16", "fp32"), "one of auto, bf16, fp32")
    if train.get("layer_norms") == "bf16" and train.get("precision") in ("fp32", "fp16"):
        problems.append(
            f"{section}.layer_norms: bf16 layer norms need bf16 autocast, not precision "
            f"{train['precision']}; set precision: bf16 (or auto), or layer_norms: auto"
        )
    need("optimizer", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    if train.get("optimizer") == "adamw_bf16" and train.get("precision") in ("fp32", "fp16"):
        problems.append(
            f"{section}.optimizer: adamw_bf16 trains bf16 weights under bf16 autocast, not with precision "
            f"{train['precision']}; set precision: bf16 (or auto), or optimizer: adamw"
        )
    need("attention_mask", lambda v: v in MASK_MODES, f"one of {', '.join(MASK_MODES)}")
    need("sharding", lambda v: v in ("none", "fsdp"), "none or fsdp")
    for key in ("select_best_epoch", "group_by_length", "cuda_graphs"):
        need(key, lambda v: isinstance(v, bool), "true or false")
    need(
        "compile",
        lambda v: isinstance(v, bool) or v in ("cudagraphs", "blocks"),
        'true, false, "cudagraphs" or "blocks"',
    )


def _check_size(key: str, v, problems: list[str], fraction_ok: bool = False) -> None:
    if v is None:
        return
    if fraction_ok and _is_num(v) and 0 < v < 1:
        return
    if not (_is_int(v) and v > 0):
        extra = " or a fraction in (0, 1)" if fraction_ok else ""
        problems.append(f"data.{key}: must be a positive integer{extra}, got {v!r}")


def normalise_methods(raw, problems: list[str]) -> list[dict]:
    """Method entries as dicts {name, label, options}; problems appended for bad entries."""
    if not isinstance(raw, list) or not raw:
        problems.append("methods: must be a non-empty list of method names or {name: ..., options} maps")
        return []
    out = [m for i, entry in enumerate(raw) if (m := _method_entry(f"methods[{i}]", entry, problems))]
    _name_labels(out, problems)
    return out


def _method_entry(where: str, entry, problems: list[str]) -> dict | None:
    """One method entry checked: its name, its options against the method's, their values."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        problems.append(f"{where}: must be a method name or a map with a `name`, got {entry!r}")
        return None
    opts = {k: v for k, v in entry.items() if k != "name"}
    try:
        method = registry.get(entry["name"])
    except UserError as e:
        problems.append(f"{where}: {e}")
        return None
    allowed = registry.allowed_options(method, opts)
    problems += [_unknown(where, k, allowed) for k in opts if k not in allowed]
    _check_train(where, {k: v for k, v in opts.items() if k in registry.TRAIN_OVERRIDES}, problems)
    for key in ("targets", "feedforward"):
        roles = opts.get(key)
        if roles is not None and (not isinstance(roles, list) or any(r not in registry.ROLES for r in roles)):
            problems.append(f"{where}.{key}: must be a list of roles from {', '.join(registry.ROLES)}")
    for key in ("r", "lora_alpha", "init_r", "target_r", "num_virtual_tokens"):
        if key in opts and not (_is_int(opts[key]) and opts[key] > 0):
            problems.append(f"{where}.{key}: must be a positive integer, got {opts[key]!r}")
    label = opts.pop("label", None)
    if label is not None and not isinstance(label, str):
        problems.append(f"{where}.label: must be a string")
        label = None
    return {"name": method.name, "label": label, "options": opts}


def _name_labels(methods: list[dict], problems: list[str]) -> None:
    """Labels name runs, run folders and report rows: unique and readable, and no two on one folder."""
    seen: dict[str, int] = {}
    for m in methods:
        if m["label"] is None:
            opts = ",".join(f"{k}={v}" for k, v in sorted(m["options"].items()))
            m["label"] = f"{m['name']}({opts})" if opts else m["name"]
        base = m["label"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            m["label"] = f"{base}#{seen[base]}"
    folders: dict[str, str] = {}
    for m in methods:
        other = folders.setdefault(registry.safe_label(m["label"]), m["label"])
        if other != m["label"]:
            problems.append(
                f"methods: the labels {other!r} and {m['label']!r} give the same run folder name "
                f"({registry.safe_label(m['label'])!r}); make them differ in letters, digits, '-', '_' "
                "or '.'"
            )


MAX_SEED_COUNT = 20


def validate(raw: Any, base_dir: Path | None = None) -> dict:
    """Check a parsed study file and return it with every default filled in.

    Raises `UserError` listing every problem found (one line each).
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise UserError("study file: must be a YAML mapping with at least `model`, `data` and `methods`")
    for key in raw:
        if key not in TOP_DEFAULTS and key not in ("data", "methods", "train"):
            problems.append(_unknown("", key, list(TOP_DEFAULTS) + ["data", "methods", "train"]))
    study = {**copy.deepcopy(TOP_DEFAULTS), **{k: v for k, v in raw.items() if k in TOP_DEFAULTS}}
    if not isinstance(study["model"], str) or not study["model"].strip():
        problems.append("model: required; an alias (minilm), a Hugging Face hub id or a local folder")
    if study["name"] is not None and not isinstance(study["name"], str):
        problems.append("name: must be a string")
    data = _validate_data(raw.get("data"), base_dir, problems)
    train = _validate_train(raw.get("train", {}) or {}, problems)
    meths = normalise_methods(raw.get("methods"), problems)
    study["seeds"] = _validate_seeds(study["seeds"], problems)
    study["lr_search"] = _validate_lr_search(study["lr_search"], problems)
    _validate_task(study, data, problems)
    _validate_execution(study, problems)
    _check_sharding(study, train, meths, problems)
    if problems:
        raise UserError(problems)
    study.update(data=data, train=train, methods=meths)
    if study["name"] is None:
        study["name"] = "study"
    return study


def tie_margin_problem(margin, name: str = "tie_margin") -> str | None:
    """What is wrong with a tie margin (None: nothing)."""
    if not _is_num(margin) or margin <= 0:
        return f"{name}: must be a positive number in the metric's units (0.01 = 1 point), got {margin!r}"
    return None


def _validate_task(study: dict, data: dict, problems: list[str]) -> None:
    """`task`, its primary `metric` (default: the task's first) and the verdicts' `tie_margin`; several label
    columns are multi-label."""
    from .metrics import TASK_METRICS, default_metric

    task = study["task"]
    if task not in TASK_METRICS:
        problems.append(f"task: must be one of {', '.join(TASK_METRICS)}, got {task!r}")
        return
    if study["metric"] is None:
        study["metric"] = default_metric(task)
    elif study["metric"] not in TASK_METRICS[task]:
        problems.append(
            f"metric: {study['metric']!r} is not a {task} metric; choose one of "
            f"{', '.join(TASK_METRICS[task])}"
        )
    if study["tie_margin"] is None:
        from .stats import TIE_MARGIN

        study["tie_margin"] = TIE_MARGIN
    problem = tie_margin_problem(study["tie_margin"])
    if problem:
        problems.append(problem)
    if isinstance(data.get("label_column"), list) and task != "multi_label":
        problems.append(
            "data.label_column: a list of 0/1 columns is a multi-label task; set task: multi_label"
        )


def _check_sharding(study: dict, train: dict, meths: list[dict], problems: list[str]) -> None:
    """`train.sharding: fsdp` shards over a run's processes: it needs several, and methods it can shard."""
    if train.get("sharding") != "fsdp":
        return
    if study["gpus_per_run"] < 2:
        problems.append(
            "train.sharding: fsdp shards a run over its GPUs; set gpus_per_run: 2 or more, or sharding: none"
        )
    for m in meths:
        method = registry.METHODS.get(m.get("name"))
        unshardable = method is not None and (
            method.quantize or method.takes_positions or method.kind == "tfidf" or method.after_step
        )
        if unshardable:
            problems.append(
                f"methods: {m['label']} cannot run with train.sharding: fsdp here (4-bit weights, soft "
                "prompts, per-step hooks such as AdaLoRA's and TF-IDF are not sharded); run it in a study "
                "with sharding: none"
            )
    if train.get("compile"):
        problems.append("train.compile: not with train.sharding: fsdp; set compile: false")
    bf16 = [
        m["label"]
        for m in meths
        if (m.get("options") or {}).get("optimizer", train.get("optimizer")) == "adamw_bf16"
    ]
    if bf16:
        problems.append(
            "train.optimizer: adamw_bf16 is not built for train.sharding: fsdp "
            f"({', '.join(bf16)}); use adamw"
        )


def _check_columns(tc, lc, problems: list[str]) -> None:
    """Text and label columns: names (or lists of names), each once, and no column both (the model would
    read the answer)."""
    names = {}
    for key, cols, what in (
        ("text_column", tc, "a column name or a list of column names"),
        ("label_column", lc, "a column name (or, for multi_label, a list of 0/1 columns)"),
    ):
        listed = [cols] if isinstance(cols, str) else cols
        ok = isinstance(listed, list) and bool(listed) and all(isinstance(c, str) for c in listed)
        if not ok:
            problems.append(f"data.{key}: must be {what}")
        elif len(set(listed)) < len(listed):
            twice = sorted({c for c in listed if listed.count(c) > 1})
            problems.append(
                f"data.{key}: {', '.join(map(repr, twice))} is named twice; name each column once"
            )
        names[key] = set(listed) if ok else set()
    both = names["text_column"] & names["label_column"]
    if both:
        problems.append(
            f"data.text_column: {', '.join(map(repr, sorted(both)))} is also the label column: the model "
            "would read the answer; name the text column(s) in data.text_column"
        )


def _validate_data(data, base_dir: Path | None, problems: list[str]) -> dict:
    if not isinstance(data, dict):
        problems.append(
            "data: required; a map with `path` (a folder of train/test files) or `name` (a hub dataset)"
        )
        data = {}
    for k in data:
        if k not in DATA_DEFAULTS:
            problems.append(_unknown("data", k, DATA_DEFAULTS))
    data = {**DATA_DEFAULTS, **{k: v for k, v in data.items() if k in DATA_DEFAULTS}}
    if data["path"] is None and data["name"] is None:
        problems.append(
            f"data: give `path` (a folder with train/test files; or set ${DATA_ENV}) or `name` "
            "(a hub dataset)"
        )
    if data["path"] is not None and not isinstance(data["path"], str):
        problems.append(f"data.path: must be a folder path, got {data['path']!r}")
    _check_columns(data["text_column"], data["label_column"], problems)
    if not (isinstance(data["label_separator"], str) and data["label_separator"]):
        problems.append(f"data.label_separator: must be a non-empty string, got {data['label_separator']!r}")
    if not isinstance(data["separator"], str):
        problems.append(
            f"data.separator: must be a string (what joins several text columns), got {data['separator']!r}"
        )
    _check_size("train_size", data["train_size"], problems)
    _check_size("test_size", data["test_size"], problems, fraction_ok=True)
    cols = data["columns"]
    if cols is not None and not (
        isinstance(cols, list)
        and cols
        and all(isinstance(c, str) for c in cols)
        and len(set(cols)) == len(cols)
    ):
        problems.append(f"data.columns: must be a list of distinct column names, got {cols!r}")
    names = data["label_names"]
    if names is not None and not (
        (isinstance(names, list) and names and len(set(map(str, names))) == len(names))
        or (isinstance(names, dict) and names and len(set(map(str, names.values()))) == len(names))
    ):
        problems.append(
            "data.label_names: must be a list of distinct names (in label order) or a map "
            f"{{label: name}} with distinct names, got {names!r}"
        )
    _check_size("validation_size", data["validation_size"], problems, fraction_ok=True)
    if not (_is_int(data["seed"]) and data["seed"] >= 0):
        problems.append(f"data.seed: must be an integer >= 0, got {data['seed']!r}")
    if not isinstance(data["allow_overlap"], bool):
        problems.append(f"data.allow_overlap: must be true or false, got {data['allow_overlap']!r}")
    if isinstance(data["path"], str) and base_dir is not None:
        p = Path(os.path.expanduser(data["path"]))
        data["path"] = str(p if p.is_absolute() else (base_dir / p))
    return data


def _validate_train(train, problems: list[str]) -> dict:
    if not isinstance(train, dict):
        problems.append("train: must be a map of training settings")
        train = {}
    train = dict(train)
    for k in train:
        if k not in TRAIN_DEFAULTS:
            problems.append(_unknown("train", k, TRAIN_DEFAULTS))
    _check_train("train", train, problems)
    return {**TRAIN_DEFAULTS, **{k: v for k, v in train.items() if k in TRAIN_DEFAULTS}}


def _validate_seeds(seeds, problems: list[str]) -> list[int]:
    if (
        _is_int(seeds) and seeds > MAX_SEED_COUNT
    ):  # `--seeds 42` meant as the seed 42 would start 42 runs a method
        problems.append(
            f"seeds: {seeds} is a count ({seeds} runs per method, over {MAX_SEED_COUNT}); for the one "
            f"seed {seeds} give a list: `seeds: [{seeds}]` in a study file, `--seeds {seeds},` on the "
            "command line"
        )
        return [42]
    if _is_int(seeds) and seeds > 0:
        return list(range(seeds))
    if not (
        isinstance(seeds, list) and seeds and all(_is_int(s) for s in seeds) and len(set(seeds)) == len(seeds)
    ):
        problems.append(f"seeds: must be a positive count or a list of distinct integers, got {seeds!r}")
        return [42]
    return seeds


def _validate_lr_search(lrs, problems: list[str]) -> dict | bool:
    if lrs is True:
        return dict(LR_SEARCH_DEFAULTS)
    if lrs in (False, None):
        return False
    if not isinstance(lrs, dict):
        problems.append("lr_search: must be false, true, or a map {points: 5, decades: 1.5}")
        return False
    for k in lrs:
        if k not in LR_SEARCH_DEFAULTS:
            problems.append(_unknown("lr_search", k, LR_SEARCH_DEFAULTS))
    lrs = {**LR_SEARCH_DEFAULTS, **lrs}
    if not (_is_int(lrs["points"]) and lrs["points"] >= 2):
        problems.append(f"lr_search.points: must be an integer >= 2, got {lrs['points']!r}")
    if not (_is_num(lrs["decades"]) and 0 < lrs["decades"] <= MAX_DECADES):
        problems.append(f"lr_search.decades: must be a number in (0, {MAX_DECADES}], got {lrs['decades']!r}")
    if not (_is_int(lrs["seeds"]) and 1 <= lrs["seeds"] <= MAX_SEED_COUNT):
        problems.append(
            f"lr_search.seeds: must be an integer from 1 to {MAX_SEED_COUNT}, got {lrs['seeds']!r}"
        )
    if lrs["schedule"] not in ("grid", "halving"):
        problems.append(f"lr_search.schedule: must be grid or halving, got {lrs['schedule']!r}")
    if not (_is_int(lrs["reduction_factor"]) and lrs["reduction_factor"] >= 2):
        problems.append(
            f"lr_search.reduction_factor: must be an integer >= 2, got {lrs['reduction_factor']!r}"
        )
    if not (_is_int(lrs["grace_epochs"]) and lrs["grace_epochs"] >= 1):
        problems.append(f"lr_search.grace_epochs: must be a positive integer, got {lrs['grace_epochs']!r}")
    if lrs["seed"] is not None and not _is_int(lrs["seed"]):
        problems.append(f"lr_search.seed: must be an integer, got {lrs['seed']!r}")
    if _is_int(lrs["points"]) and lrs["points"] > MAX_LR_POINTS:
        problems.append(
            f"lr_search.points: at most {MAX_LR_POINTS} learning rates per method, got {lrs['points']}"
        )
    return lrs


def _validate_execution(study: dict, problems: list[str]) -> None:
    """Where and how runs execute: device, isolation, executors, tracking, memory budget."""

    def need(key, ok, what):
        if not ok(study[key]):
            problems.append(f"{key}: must be {what}, got {study[key]!r}")

    if study["device"] not in ("auto", "cpu", "cuda") and not str(study["device"]).startswith("cuda:"):
        problems.append(f"device: must be auto, cpu, cuda or cuda:N, got {study['device']!r}")
    need("isolation", lambda v: v in ("process", "inline"), "process (each run in its own process) or inline")
    need("parallel", lambda v: _is_int(v) and v >= 1, "a positive integer")
    need("executor", lambda v: v in ("local", "ray"), "local or ray")
    need(
        "ray_address",
        lambda v: (
            v is None
            or (isinstance(v, str) and (v in ("auto", "local") or re.fullmatch(r"(ray://)?[^\s:/]+:\d+", v)))
        ),
        "auto, host:port or ray://host:port",
    )
    need("ray_cpus_per_run", lambda v: _is_int(v) and v >= 1, "a positive integer")
    need("gpus_per_run", lambda v: _is_int(v) and v >= 1, "a positive integer")
    if study["gpus_per_run"] != 1 and study["isolation"] == "inline":
        problems.append("gpus_per_run > 1 needs isolation: process (torchrun starts the processes)")
    if study["executor"] == "ray" and study["isolation"] == "inline":
        problems.append(
            "isolation: inline cannot be used with executor: ray (each Ray actor runs worker processes)"
        )
    need("tracking", lambda v: v in (None, "tensorboard", "mlflow"), "null, tensorboard or mlflow")
    need("tracking_every", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("max_oom_retries", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    need("checkpoint_every_seconds", lambda v: _is_num(v) and v >= 0, "a number of seconds >= 0")
    flags = (
        "trust_remote_code",
        "allow_pickle",
        "report",
        "exclusive_finals",
        "warm_trials",
        "mps",
        "profile",
    )
    for key in flags:
        need(key, lambda v: isinstance(v, bool), "true or false")
    if study["gpu_memory"] is not None:
        from .memory import parse_size

        try:
            parse_size(study["gpu_memory"], "gpu_memory")
        except UserError as e:
            problems.append(str(e))


class StrictLoader(yaml.SafeLoader):
    """YAML as a study file needs it: no aliases (a few hundred bytes of them can expand to gigabytes), and
    no key given twice in one mapping (YAML keeps the last one silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UserError(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed; "
                "write the values out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise UserError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (first at line "
                    f"{seen[key]}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"study file {path} not found; give the path of a YAML study file or use --preset"
        ) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise UserError(f"study file {path} cannot be read as UTF-8 text ({type(e).__name__})") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader, stricter still
    except UserError as e:
        raise UserError(f"study file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"study file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("peftbench.presets").iterdir() if p.name.endswith(".yaml")
    )


def load_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise UserError(f"unknown preset '{name}'; choose one of {', '.join(names)}")
    return yaml.safe_load(resources.files("peftbench.presets").joinpath(f"{name}.yaml").read_text())


SHARED_IMDB = "../shared/data/imdb"


def sample_data_path() -> str:
    """The IMDb sample shipped inside the package: 2,000 train / 1,000 test reviews
    (tools/make_imdb_sample.py)."""
    return str(resources.files("peftbench").joinpath("sample_data", "imdb"))


def default_data_path() -> str:
    """The IMDb folder a study uses when none is given: $PEFTBENCH_DATA, else ../shared/data/imdb from the
    working folder if it exists, else the sample shipped with the package."""
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    return SHARED_IMDB if Path(SHARED_IMDB, "train.parquet").exists() else sample_data_path()
