"""The `peftbench` command: run, report, recommend, compare, predict, methods.

Every bad input ends with one line per problem on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError

TIE_MARGIN_HELP = (
    "the verdicts' tie margin in the metric's units, in place of the study's tie_margin, e.g. --tie-margin "
    "0.02 (2 points; nothing retrains)"
)


def _parse_seeds(text: str):
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise UserError(f"--seeds: give a count (3) or a comma list (0,1,2), got {text!r}") from None


def _list(text: str | None, single_as_str: bool = False):
    """A comma list from the command line (None stays None; one item stays a string where asked)."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items[0] if single_as_str and len(items) == 1 else items


def _size(text: str):
    """A count (500) or a fraction (0.2)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"give a count (500) or a fraction (0.2), got {text!r}"
            ) from None


def build_study(args) -> tuple[dict, Path]:
    """The raw study dict from a file, a preset or flags alone, with command-line overrides applied, and its
    output folder."""
    raw = dict(_base_study(args))
    if isinstance(raw.get("data", {}), dict):
        raw["data"] = _data_overrides(dict(raw.get("data") or {}), args)
    if args.model:
        raw["model"] = args.model
    if args.methods:
        raw["methods"] = _methods_override(raw.get("methods"), args.methods)
    if isinstance(raw.get("train", {}), dict):
        raw["train"] = _train_overrides(dict(raw.get("train") or {}), args)
    if args.seeds is not None:
        raw["seeds"] = _parse_seeds(args.seeds)
    if args.lr_search:
        raw["lr_search"] = True
    for key in (
        "task",
        "metric",
        "device",
        "parallel",
        "isolation",
        "executor",
        "gpus_per_run",
        "gpu_memory",
    ):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.address is not None:
        raw["ray_address"] = args.address
    if getattr(args, "profile", False):
        raw["profile"] = True
    if args.concurrent_finals:
        raw["exclusive_finals"] = False
    if getattr(args, "mps", False):
        raw["mps"] = True
    name = raw.get("name") or (args.preset or (Path(args.study).stem if args.study else "study"))
    from .methods import safe_label  # a study name never becomes a path unsanitised ("../../x" -> "x")

    return raw, Path(args.out) if args.out else Path("runs") / safe_label(str(name))


def _base_study(args) -> dict:
    from . import config

    if args.study and args.preset:
        raise UserError("give a study file or --preset, not both")
    if args.preset:
        return config.load_preset(args.preset)
    if args.study:
        raw = config.load_yaml(Path(args.study))
        if not isinstance(raw, dict):
            raise UserError(f"study file {args.study}: must be a YAML mapping with model, data and methods")
        return raw
    if args.model or args.data:  # flags alone: the quick preset's protocol over all of the given data
        return {**config.load_preset("quick"), "name": "cli", "data": {}}
    raise UserError(
        "give a study file (peftbench run STUDY.yaml), a preset (peftbench run --preset quick) or "
        "--model/--data"
    )


def _data_overrides(data: dict, args) -> dict:
    from . import config

    if args.data:
        data["path"], data["name"] = args.data, None
    elif not data.get("path") and not data.get("name"):
        data["path"] = config.default_data_path()
        if data["path"] == config.sample_data_path():
            print(
                "peftbench: data: the IMDb sample shipped with peftbench (2,000 train / 1,000 test reviews); "
                "--data DIR for the full copy or your own",
                file=sys.stderr,
            )
    flags = {
        "train_size": args.train_size,
        "test_size": args.test_size,
        "label_column": _list(args.label_column, True),
        "text_column": _list(args.text_column, True),
        "label_names": _list(args.label_names),
        "columns": _list(args.columns),
    }
    return {**data, **{k: v for k, v in flags.items() if v is not None}}


def _methods_override(entries, text: str) -> list:
    """--methods: a method the study already configures keeps its settings; others get the defaults."""
    known: dict = {}
    for e in entries or []:
        if isinstance(e, str):
            known.setdefault(e, e)
        elif isinstance(e, dict):
            for key in ("label", "name"):
                if isinstance(e.get(key), str):
                    known.setdefault(e[key], e)
    return [known.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]


def _train_overrides(train: dict, args) -> dict:
    flags = {
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "max_length": args.max_length,
        "compile": {"off": False, "on": True}.get(args.compile, args.compile),
        "cuda_graphs": {"on": True, "off": False}.get(args.cuda_graphs),
        "packing": {"on": True, "off": False, "auto": "auto"}.get(args.packing),
    }
    return {**train, **{k: v for k, v in flags.items() if v is not None}}


def cmd_run(args) -> int:
    from . import config
    from .report import import_dependencies, print_summary, write_report
    from .runner import Study, bytecode_note

    raw, out = build_study(args)
    study = config.validate(raw, base_dir=Path.cwd())
    out, note = (out, None) if args.out else _free_default_out(out, study)
    if slow := bytecode_note():  # after the checks: a bad input gets its one line alone
        print(f"peftbench: note: {slow}", file=sys.stderr)
    report = study["report"] and not args.no_report
    results = Study(study, out, folder_note=note).run(args.force, import_dependencies if report else None)
    print_summary(out)
    if report:
        paths = write_report(out)
        print(f"report: {paths['html']}")
    failed = [r for r in results if r["status"] in ("failed",)]
    return 1 if failed and len(failed) == len(results) else 0


def _free_default_out(out: Path, study: dict) -> tuple[Path, str | None]:
    """The default folder runs/NAME, unless it holds another study: then runs/NAME-<hash of the study's
    name, model and data>, so that two studies (from files of one name, or from flags alone) never write
    into one folder. Also the note that says so, which the study prints once its model and data check out
    (a study that fails its checks writes nowhere, and its error stays the one line it prints)."""
    from . import store

    identity = store.study_identity(study)
    if store.folder_owner(out) in (None, identity):
        return out, None
    alt = out.with_name(f"{out.name}-{identity[:6]}")
    if store.folder_owner(alt) not in (None, identity):
        raise UserError(f"{out} and {alt} hold other studies' files; choose a folder with --out")
    return alt, f"{out} holds another study; writing to {alt} (--out to choose)"


def cmd_plan(args) -> int:
    """The memory plan alone: per method, fits or not, micro-batch, checkpointing, peak GB and time."""
    from . import config
    from .runner import Study

    raw, out = build_study(args)
    study = config.validate(raw, base_dir=Path.cwd())
    out, note = (out, None) if args.out else _free_default_out(out, study)
    rows = Study(study, out, folder_note=note).plan()
    print(plan_table(rows, study["gpu_memory"]))
    if any(r.get("estimated") for r in rows):
        print(
            "no GPU here: peak GB estimated from each model's config (no weights read) and the longest "
            "training texts, time not estimated; on a GPU, plan measures both (README: Memory)"
        )
    return 0 if all(r.get("status") in ("planned", "does not fit") for r in rows) else 1


def plan_table(rows: list[dict], budget) -> str:
    from .report import markdown_table

    header = [
        "method",
        "fits" + (f" in {budget}" if budget else ""),
        "micro-batch",
        "checkpointing",
        "peak reserved GB",
        "s / epoch (est.)",
        "s for the study (est.)",
        "note",
    ]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    table = []
    for r in rows:
        fits = {"planned": "yes", "does not fit": "no"}.get(r.get("status"), r.get("status"))
        note = r.get("error") or ""
        note = note if fits == "no" else note[:90]  # "no": peftbench's own words, whole
        fits += " (est.)" if r.get("estimated") else ""
        peak = r.get("peak_reserved_mb")
        table.append(
            [
                r.get("label", "?"),
                fits,
                num(r.get("micro_batch_size"), "d"),
                {True: "on", False: "off"}.get(r.get("gradient_checkpointing"), "-"),
                num(peak / 1024 if peak is not None else None, ".1f"),
                num(r.get("epoch_seconds"), ".1f"),
                num(r.get("study_seconds"), ".0f"),
                note,
            ]
        )
    return markdown_table(header, table)


def cmd_methods(args) -> int:
    from .methods import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        lr = f"{r['learning_rate']:.0e}" if r["learning_rate"] else "-"
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['name']:<14} {r['kind']:<11} lr {lr:<6} {r['description']}")
        if opts:
            print(f"{'':<14} options: {opts}")
        print(f"{'':<14} source: {r['source']}")
    return 0


def cmd_predict(args) -> int:
    from .predict import readable_outputs, text_logits

    texts = list(args.text)
    if args.file:
        try:
            texts += [
                ln.rstrip("\n")
                for ln in Path(args.file).read_text(encoding="utf-8").splitlines()
                if ln.strip()
            ]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--file {args.file} cannot be read as UTF-8 text ({type(e).__name__})") from None
    if not texts:
        raise UserError('give texts to classify: peftbench predict RUN_DIR "some text" or --file FILE')
    from .devices import resolve_device

    device = resolve_device(args.device)  # cuda on a machine without one: a one-line error
    _quiet_loading()
    spec, logits = text_logits(Path(args.run_dir), texts, device=device)
    rows = [{"text": t, **row} for t, row in zip(texts, readable_outputs(spec, logits))]
    if args.output:
        _write_predictions(Path(args.output), texts, spec, logits)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{_shown(row)}\t{row['text'][:80]}")
    return 0


def _quiet_loading() -> None:
    """No weight-loading bars or library warnings around the predictions."""
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _shown(row: dict) -> str:
    """A prediction on one line: the class, the score or the labels, then the probabilities."""
    if "score" in row:
        return f"{row['score']:.4f}"
    probs = " ".join(f"{k}={v:.3f}" for k, v in row["probabilities"].items())
    return f"{row['label'] if 'label' in row else ','.join(row['labels']) or '(none)'}\t{probs}"


def _write_predictions(path: Path, texts: list[str], spec, logits) -> None:
    """The predictions as a run's predictions.parquet has them: row (the text's place in the input),
    text_sha1, prediction, p_<class>."""
    import pandas as pd

    from .artefacts import predictions_frame, text_sha1

    base = pd.DataFrame({"row": range(len(texts)), "text_sha1": [text_sha1(t) for t in texts]})
    try:
        predictions_frame(base, logits, spec.label_names, spec.task).to_parquet(path, index=False)
    except OSError as e:
        raise UserError(f"--output {path}: cannot write there ({e.strerror or e})") from None


def cmd_report(args) -> int:
    from .report import print_summary, write_report

    paths = write_report(Path(args.study_dir), _tie_margin(args.tie_margin))
    print_summary(Path(args.study_dir))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_recommend(args) -> int:
    from .report import recommend_cli

    return recommend_cli(
        Path(args.study_dir),
        args.max_memory,
        args.max_train_time,
        args.min_score,
        _tie_margin(args.tie_margin),
    )


def _tie_margin(text: str | None) -> float | None:
    from .config import tie_margin_problem

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = text
    problem = tie_margin_problem(value, "--tie-margin")
    if problem:
        raise UserError(problem)
    return value


def cmd_compare(args) -> int:
    from .report import compare_cli

    return compare_cli([Path(d) for d in args.study_dirs], Path(args.out) if args.out else None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftbench")
    except PackageNotFoundError:
        return "unknown"


def _study_arguments(r: argparse.ArgumentParser) -> None:
    """The arguments `run` and `plan` share: the study and what the command line overrides in it."""
    a = r.add_argument
    a(
        "study",
        nargs="?",
        help="a study YAML file, e.g. studies/all-methods.yaml (or --preset, or flags alone)",
    )
    a(
        "--preset",
        help="quick (the offline CPU demo), seed (the starting study's single-lr protocol) or fair "
        "(per-method lr search, 3 seeds), e.g. --preset quick",
    )
    a("--out", help="the study folder (default runs/NAME), e.g. --out runs/mine")
    a("--model", help="minilm, a Hugging Face hub id or a local folder, e.g. --model roberta-base")
    a(
        "--data",
        help="a folder with train and test files (parquet, csv, tsv, jsonl) or one data file (its test "
        "split is carved out), e.g. --data data/imdb; default $PEFTBENCH_DATA, ../shared/data/imdb, the "
        "IMDb sample",
    )
    a("--methods", help="a comma list of methods (`peftbench methods`), e.g. --methods full,lora,qlora,ia3")
    a("--text-column", help="the text column, or two or more joined, e.g. --text-column title,description")
    a(
        "--label-column",
        help="the label column (several 0/1 columns for multi_label), e.g. --label-column label",
    )
    a("--task", help="classification (default), regression or multi_label, e.g. --task regression")
    a(
        "--metric",
        help="the primary metric (default per task: accuracy, pearson, micro_f1), e.g. --metric mcc",
    )
    a("--label-names", help="class names in label order, e.g. --label-names World,Sports,Business,Sci/Tech")
    a(
        "--columns",
        help="column names of a CSV/TSV without a header row, e.g. --columns label,title,description",
    )
    a("--train-size", type=int, help="training rows (seeded, stratified subset), e.g. --train-size 3000")
    a(
        "--test-size",
        type=_size,
        help="test rows, or a fraction (of one data file: carved out of it), e.g. "
        "--test-size 2000 or --test-size 0.2",
    )
    a("--epochs", type=int, help="epochs for every method, e.g. --epochs 3")
    a("--lr", type=float, help="one learning rate for every method (the single-lr protocol), e.g. --lr 2e-5")
    a(
        "--max-length",
        type=int,
        help="tokens per text (longer texts are cut; the report counts them), e.g. --max-length 256",
    )
    a("--seeds", help="a count or a list, e.g. --seeds 3 or --seeds 0,1,2 (one seed: --seeds 42,)")
    a(
        "--lr-search",
        action="store_true",
        help="search each method's learning rate on validation, e.g. "
        "--lr-search (5 rates over 1.5 decades unless the study says otherwise)",
    )
    a("--device", help="auto, cpu, cuda or cuda:N, e.g. --device cuda:1")
    a(
        "--parallel",
        type=int,
        help="trial runs at once on one device (timings flagged as concurrent), e.g. --parallel 3",
    )
    a(
        "--compile",
        choices=["off", "on", "cudagraphs", "blocks"],
        help="torch.compile the model; cudagraphs adds its CUDA graphs per bucketed shape (GPU); blocks "
        "compiles each transformer layer, keeping peftbench's graphs and packing, e.g. --compile blocks",
    )
    a(
        "--cuda-graphs",
        choices=["on", "off"],
        help="replay each training step from a CUDA graph per batch shape "
        "(default on, CUDA, where the host bounds a micro-step), e.g. --cuda-graphs off",
    )
    a(
        "--packing",
        choices=["auto", "on", "off"],
        help="padding-free training batches: sequences packed back to back, attention within each "
        "(default auto: on CUDA where a probe shows the padded logits), e.g. --packing off",
    )
    a(
        "--concurrent-finals",
        action="store_true",
        help="let final runs share the device too (default: finals "
        "run alone for clean timings), e.g. --parallel 3 --concurrent-finals",
    )
    a(
        "--isolation",
        choices=["process", "inline"],
        help="a fresh process per run (default) or all in this process, e.g. --isolation inline",
    )
    a(
        "--executor",
        choices=["local", "ray"],
        help="run locally (default) or on a Ray cluster, e.g. --executor ray",
    )
    a(
        "--gpus-per-run",
        type=int,
        help="data-parallel training of each run over N GPUs (torchrun); the batch "
        "stays batch_size examples per optimizer step, e.g. --gpus-per-run 2",
    )
    a("--address", help="the Ray cluster's address (default: a local Ray instance), e.g. --address auto")
    a(
        "--gpu-memory",
        help="GPU memory budget per run (GB = 2^30 bytes): each run is capped to it and picks the "
        "largest micro-batch (and checkpointing if needed) that fits, e.g. --gpu-memory 24GB",
    )


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit status 2, like every other bad input."""

    def error(self, message: str):
        command = self.prog.removeprefix("peftbench").strip()
        print(
            f"peftbench: error: {command + ': ' if command else ''}{UserError(message).problems[0]}; "
            f"see `{self.prog} --help`",
            file=sys.stderr,
        )
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="peftbench",
        description="Compare fine-tuning methods for text classification under one fair, measured protocol.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a study (a YAML file or a preset)")
    _study_arguments(r)
    r.add_argument(
        "--profile",
        action="store_true",
        help="a torch.profiler profile of steps 20-50 in each run's profile.json, e.g. --profile",
    )
    r.add_argument(
        "--mps",
        action="store_true",
        help="runs sharing a GPU run their kernels side by side under NVIDIA's Multi-Process Service, "
        "started for the study (instead of taking turns on the GPU), e.g. --parallel 4 --mps",
    )
    r.add_argument("--no-report", action="store_true", help="skip the HTML/Markdown report, e.g. --no-report")
    r.add_argument(
        "--force",
        action="store_true",
        help="run into a folder that holds another study (or other "
        "files): its contents move into an archive- subfolder first, e.g. --out runs/x --force",
    )
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser(
        "plan",
        help="the GPU memory plan alone: does each method fit, at what micro-batch, "
        "how long; no training; without a GPU, memory estimated from the model's config (e.g. peftbench "
        "plan study.yaml --gpu-memory 24GB)",
    )
    _study_arguments(pl)
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("methods", help="list the methods with their defaults and sources")
    m.add_argument("--json", action="store_true", help="as JSON, e.g. peftbench methods --json")
    m.set_defaults(func=cmd_methods)

    pr = sub.add_parser("predict", help="classify texts with a trained run")
    pr.add_argument("run_dir", help="a run folder, e.g. runs/quick/runs/lora-final-lr5.00e-04-s42")
    pr.add_argument("text", nargs="*", help='texts to classify, e.g. "What a wonderful film"')
    pr.add_argument("--file", help="a file with one text per line, e.g. --file reviews.txt")
    pr.add_argument(
        "--output",
        help="also write the predictions as Parquet (row, text_sha1, prediction, p_<class>; "
        "as a run's predictions.parquet), e.g. --output preds.parquet",
    )
    pr.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU if there is one), cpu, cuda or cuda:N, e.g. --device cpu",
    )
    pr.add_argument(
        "--json", action="store_true", help="one JSON object per text instead of a table line, e.g. --json"
    )
    pr.set_defaults(func=cmd_predict)

    rep = sub.add_parser("report", help="write report.md, report.html and plots for a study folder")
    rep.add_argument("study_dir", help="a study folder, e.g. runs/quick")
    rep.add_argument("--tie-margin", help=TIE_MARGIN_HELP)
    rep.set_defaults(func=cmd_report)

    rec = sub.add_parser("recommend", help="rank methods under constraints, from a study's measurements")
    rec.add_argument("study_dir", help="a study folder, e.g. runs/fair")
    rec.add_argument(
        "--max-memory",
        help="peak memory (GPU: the device figure; host for CPU studies), e.g. --max-memory 24GB or 500MB",
    )
    rec.add_argument(
        "--max-train-time", help="training time of a run, e.g. --max-train-time 10m (or 90s, 1h)"
    )
    rec.add_argument(
        "--min-score",
        "--min-accuracy",  # the name before studies had other metrics
        dest="min_score",
        type=float,
        help="the study's primary metric (accuracy unless the study names another; at most, for mse), "
        "e.g. --min-score 0.9",
    )
    rec.add_argument("--tie-margin", help=TIE_MARGIN_HELP)
    rec.set_defaults(func=cmd_recommend)

    cmp_ = sub.add_parser("compare", help="put studies side by side")
    cmp_.add_argument("study_dirs", nargs="+", help="study folders, e.g. runs/seed runs/fair")
    cmp_.add_argument("--out", help="also write the comparison as Markdown, e.g. --out comparison.md")
    cmp_.set_defaults(func=cmd_compare)
    return p


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # no line per retry before our one-line error
    args = parser().parse_args(argv)
    import atexit
    import gc
    import signal
    import threading

    # As the process ends, nothing is left to collect: the garbage collector's last passes over every
    # object that torch, transformers and matplotlib made took 0.9 s of a study command's exit (2-core CPU).
    atexit.register(gc.freeze)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):  # end like Ctrl-C: the workers die with this process
            signal.signal(sig, _interrupt)
    try:
        code = args.func(args)
    except UserError as e:
        for line in e.problems:
            print(f"peftbench: error: {line}", file=sys.stderr)
        if "peftbench.runner" in sys.modules:
            sys.modules["peftbench.runner"].stop_idle_forkserver()
        sys.exit(2)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        sys.stderr.close()
        sys.exit(0)
    except KeyboardInterrupt:
        from .runner import stop_workers

        stop_workers()
        print(
            "peftbench: interrupted; finished runs are kept, rerun the same command to continue",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: it would wait for the threads that ran runs side by side, and a thread may still be
        # starting a worker. Results are written as runs end and the study lock is released by now; workers
        # and the forkserver die with this process (worker.die_with_parent).
        os._exit(130)
    sys.exit(code)
