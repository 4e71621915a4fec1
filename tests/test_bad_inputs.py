"""The bad-input catalogue: each case through the real CLI gets one line per problem, exit status 2, no
traceback.

`python tests/test_bad_inputs.py` prints the catalogue with the message each case produces.
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_encoder, write_dataset  # noqa: E402

from peftbench import cli, models  # noqa: E402


def _study(tmp: Path, model: Path, data_dir: Path, **over) -> dict:
    s = {
        "model": str(model),
        "data": {"path": str(data_dir), "train_size": 60, "validation_size": 12, "test_size": 30},
        "methods": ["lora"],
        "train": {"epochs": 1, "max_length": 32},
        "isolation": "inline",
        "report": False,
    }
    for k, v in over.items():
        s[k] = {**s[k], **v} if isinstance(v, dict) and isinstance(s.get(k), dict) else v
    return s


def _data(tmp: Path, fmt="jsonl", mutate=None, split="train") -> Path:
    folder = write_dataset(tmp / "data", fmt)
    if mutate:
        path = folder / f"{split}.{fmt}"
        df = pd.read_json(path, lines=True) if fmt == "jsonl" else pd.read_parquet(path)
        df = mutate(df)
        df.to_json(path, orient="records", lines=True) if fmt == "jsonl" else df.to_parquet(path)
    return folder


def _write(tmp: Path, study: dict | str) -> Path:
    f = tmp / "study.yaml"
    f.write_text(study if isinstance(study, str) else yaml.safe_dump(study))
    return f


def _run(tmp, model, study_or_text, extra=()) -> list[str]:
    return ["run", str(_write(tmp, study_or_text)), "--out", str(tmp / "out"), *extra]


def _file_data(tmp, name, content: bytes) -> Path:
    folder = write_dataset(tmp / "data", "csv")
    (folder / name).write_bytes(content)
    return folder


# (case, setup(tmp, model) -> argv, expected text in the message)
CASES = [
    ("an unknown command", lambda t, m: ["trian"], "error: argument command: invalid choice: 'trian'"),
    ("data folder missing", lambda t, m: _run(t, m, _study(t, m, t / "nowhere")), "not found; pass --data"),
    (
        "data path is a file that is not data",
        lambda t, m: _run(t, m, _study(t, m, _file_data(t, "x.txt", b"x") / "x.txt")),
        "not a data file",
    ),
    ("no train file", lambda t, m: _run(t, m, _study(t, m, _no_train(t))), "no train file"),
    ("empty data file", lambda t, m: _run(t, m, _study(t, m, _file_data(t, "train.csv", b""))), "is empty"),
    ("corrupt parquet", lambda t, m: _run(t, m, _study(t, m, _corrupt(t))), "cannot be read as parquet"),
    (
        "non-UTF-8 bytes",
        lambda t, m: _run(t, m, _study(t, m, _file_data(t, "train.csv", b"text,label\ncaf\xe9,1\nb,0\n"))),
        "not UTF-8",
    ),
    (
        "text column absent",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"text_column": "review"})),
        "column 'review' not in the train file",
    ),
    (
        "label column absent",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"label_column": "y"})),
        "column 'y' not in the train file",
    ),
    (
        "one class only",
        lambda t, m: _run(t, m, _study(t, m, _data(t, mutate=lambda d: d.assign(label=1)))),
        "only one class",
    ),
    (
        "labels out of range (negative)",
        lambda t, m: _run(
            t, m, _study(t, m, _data(t, mutate=lambda d: d.assign(label=[-1] + list(d.label[1:]))))
        ),
        "is negative",
    ),
    (
        "labels of mixed types",
        lambda t, m: _run(
            t, m, _study(t, m, _data(t, mutate=lambda d: d.assign(label=["x"] + list(d.label[1:]))))
        ),
        "mix integers and strings",
    ),
    (
        "non-integral labels",
        lambda t, m: _run(
            t, m, _study(t, m, _data(t, mutate=lambda d: d.assign(label=[0.5] + list(d.label[1:]))))
        ),
        "looks like regression",
    ),
    (
        "empty text",
        lambda t, m: _run(
            t, m, _study(t, m, _data(t, mutate=lambda d: d.assign(text=[" "] + list(d.text[1:]))))
        ),
        "empty text",
    ),
    (
        "None text",
        lambda t, m: _run(
            t, m, _study(t, m, _data(t, mutate=lambda d: d.assign(text=[None] + list(d.text[1:]))))
        ),
        "missing or non-text",
    ),
    (
        "test label never in train",
        lambda t, m: _run(
            t,
            m,
            _study(t, m, _data(t, mutate=lambda d: d.assign(label=[5] + list(d.label[1:])), split="test")),
        ),
        "never occur in train",
    ),
    (
        "train_size beyond the data",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"train_size": 10_000})),
        "is larger than the train split",
    ),
    (
        "unknown top-level key",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "epochs": 3}),
        "epochs: unknown key",
    ),
    (
        "unknown method",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "methods": ["lorra"]}),
        "unknown method 'lorra' (did you mean 'lora'?)",
    ),
    (
        "unknown method option",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "methods": [{"name": "lora", "rank": 4}]}),
        "methods[0].rank: unknown key",
    ),
    (
        "negative learning rate",
        lambda t, m: _run(t, m, _study(t, m, _data(t), train={"learning_rate": -1})),
        "train.learning_rate: must be a positive number",
    ),
    (
        "negative checkpoint interval",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "checkpoint_every_seconds": -1}),
        "checkpoint_every_seconds: must be a number of seconds >= 0",
    ),
    (
        "zero epochs",
        lambda t, m: _run(t, m, _study(t, m, _data(t), train={"epochs": 0})),
        "train.epochs: must be a positive integer",
    ),
    (
        "NaN hyper-parameter",
        lambda t, m: _run(
            t,
            m,
            yaml.safe_dump(_study(t, m, _data(t))).replace("epochs: 1", "epochs: 1\n  weight_decay: .nan"),
        ),
        "train.weight_decay: must be a number >= 0",
    ),
    (
        "wrong type",
        lambda t, m: _run(t, m, _study(t, m, _data(t), train={"batch_size": "16"})),
        "train.batch_size: must be a positive integer",
    ),
    (
        "duplicate seeds",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "seeds": [1, 1]}),
        "distinct integers",
    ),
    (
        "max_length beyond the model",
        lambda t, m: _run(t, m, _study(t, m, _data(t), train={"max_length": 4096})),
        "exceeds what model",
    ),
    (
        "model folder without config",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "model": str(_empty(t))}),
        "has no config.json",
    ),
    (
        "model folder that does not exist",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "model": str(t / "no-such-folder")}),
        "no such folder, and not a Hugging Face Hub id",
    ),
    (
        "model id unreachable offline",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "model": "no-such-org/no-such-model"}),
        "could not be loaded: not a local folder and not reachable",
    ),
    (
        "pickle-only weights",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "model": str(_pickle_model(t, m))}),
        "has no safetensors weights",
    ),
    (
        "output folder not writable",
        lambda t, m: ["run", str(_write(t, _study(t, m, _data(t)))), "--out", str(_a_file(t) / "sub")],
        "is not writable",
    ),
    (
        "regression over string labels",
        lambda t, m: _run(
            t,
            m,
            _study(t, m, _data(t, mutate=lambda df: df.assign(label=["pos"] * len(df))), task="regression"),
        ),
        "is not a number; task: regression needs numeric scores",
    ),
    (
        "the label column given as a text column",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"text_column": ["text", "label"]})),
        "data.text_column: 'label' is also the label column: the model would read the answer",
    ),
    (
        "a sentence pair that names one column twice",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"text_column": ["text", "text"]})),
        "data.text_column: 'text' is named twice; name each column once",
    ),
    (
        "a label written with a trailing space",
        lambda t, m: _run(t, m, _study(t, m, _data(t, mutate=_spaced_label))),
        "the labels 'pos' and 'pos ' differ only in spaces around them",
    ),
    (
        "regression test scores that never vary",
        lambda t, m: _run(
            t,
            m,
            _study(t, m, _data(t, mutate=lambda df: df.assign(label=2.5), split="test"), task="regression"),
        ),
        "every test score is 2.5: a correlation with constant scores is undefined",
    ),
    (
        "multi-label with an empty label set",
        lambda t, m: _run(
            t,
            m,
            _study(t, m, _data(t, mutate=lambda df: df.assign(label=[""] * len(df))), task="multi_label"),
        ),
        "the label set is empty",
    ),
    (
        "multi-label 0/1 columns holding a 2",
        lambda t, m: _run(
            t,
            m,
            _study(
                t,
                m,
                _data(t, mutate=lambda df: df.assign(other=2)),
                task="multi_label",
                data={"label_column": ["label", "other"]},
            ),
        ),
        "each label column of a multi_label task must hold 0 or 1",
    ),
    (
        "several label columns for classification",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"label_column": ["label", "other"]})),
        "a list of 0/1 columns is a multi-label task; set task: multi_label",
    ),
    ("unknown task", lambda t, m: _run(t, m, _study(t, m, _data(t), task="ranking")), "task: must be one of"),
    (
        "a metric of another task",
        lambda t, m: _run(t, m, _study(t, m, _data(t), task="regression", metric="accuracy")),
        "metric: 'accuracy' is not a regression metric",
    ),
    (
        "a tie margin in percent",
        lambda t, m: _run(t, m, _study(t, m, _data(t), tie_margin="1%")),
        "tie_margin: must be a positive number in the metric's units (0.01 = 1 point), got '1%'",
    ),
    (
        "a negative tie margin for a report",
        lambda t, m: ["recommend", str(t), "--tie-margin", "-0.01"],
        "--tie-margin: must be a positive number in the metric's units (0.01 = 1 point), got -0.01",
    ),
    (
        "MCC over three classes",
        lambda t, m: _run(t, m, _study(t, m, write_dataset(t / "three", "jsonl", classes=3), metric="mcc")),
        "metric: mcc needs two classes, the data have 3",
    ),
    ("study file missing", lambda t, m: ["run", str(t / "missing.yaml")], "not found"),
    ("study file not YAML", lambda t, m: _run(t, m, "model: [unclosed"), "not valid YAML"),
    (
        "unsafe YAML tag",
        lambda t, m: _run(t, m, "model: !!python/object/apply:os.system ['true']"),
        "not valid YAML",
    ),
    ("no study and no preset", lambda t, m: ["run"], "give a study file"),
    ("unknown preset", lambda t, m: ["run", "--preset", "quik"], "unknown preset 'quik'"),
    (
        "bad --seeds",
        lambda t, m: _run(t, m, _study(t, m, _data(t)), ["--seeds", "a,b"]),
        "--seeds: give a count",
    ),
    (
        "--seeds 42 meant as one seed",
        lambda t, m: _run(t, m, _study(t, m, _data(t)), ["--seeds", "42"]),
        "seeds: 42 is a count (42 runs per method, over 20); for the one seed 42 give a list",
    ),
    ("predict on a folder that is no run", lambda t, m: ["predict", str(t), "text"], "is not a run folder"),
    ("report on an empty folder", lambda t, m: ["report", str(t)], "holds no run results yet"),
    (
        "recommend with a bad memory size",
        lambda t, m: ["recommend", str(_a_study(t, m)), "--max-memory", "lots"],
        "--max-memory: give a size",
    ),
    ("two studies on one folder", lambda t, m: _locked(t, m), "another peftbench"),
    (
        "Ray address not host:port",
        lambda t, m: _run(
            t,
            m,
            {**_study(t, m, _data(t)), "isolation": "process"},
            ["--executor", "ray", "--address", "headnode"],
        ),
        "ray_address: must be auto, host:port or ray://host:port, got 'headnode'",
    ),
    (
        "model folder without tokenizer files",
        lambda t, m: _run(t, m, _study(t, m / ".." / "no-tok", _data(t))) if _no_tokenizer(t, m) else None,
        "of the training text to the unknown token",
    ),
    (
        "train and test the same split",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"test_split": "train"})),
        "train_split and test_split are both 'train'",
    ),
    (
        "test texts copied from train",
        lambda t, m: _run(t, m, _study(t, m, _leaky(t))),
        "are also training texts",
    ),
    (
        "a key given twice",
        lambda t, m: _run(t, m, yaml.safe_dump(_study(t, m, _data(t))) + "train: {epochs: 3}\n"),
        "key 'train' is given twice",
    ),
    (
        "a YAML alias bomb",
        lambda t, m: _run(
            t,
            m,
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a]\n"
            + yaml.safe_dump(_study(t, m, _data(t))),
        ),
        "YAML aliases (*a) are not",
    ),
    (
        "lr grid wider than six decades",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "lr_search": {"points": 3, "decades": 40}}),
        "lr_search.decades: must be a number in (0, 6]",
    ),
    (
        "lr grid with repeated rates",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "lr_search": {"points": 40, "decades": 0.01}}),
        "repeated or degenerate rates",
    ),
    (
        "a sentence pair whose second column is missing",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"text_column": ["text", "hypothesis"]})),
        "data.text_column: column 'hypothesis' not in the train file",
    ),
    (
        "a sentence pair with an empty second text",
        lambda t, m: _run(
            t,
            m,
            _study(
                t,
                m,
                _data(t, mutate=lambda df: df.assign(b=["" if i == 3 else "x" for i in range(len(df))])),
                data={"text_column": ["text", "b"]},
            ),
        ),
        "train rows have an empty 'b' (first at row 3); a sentence pair needs both texts",
    ),
    (
        "a negative data seed",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"seed": -1})),
        "data.seed: must be an integer >= 0",
    ),
    (
        "terminal escapes in a method name",
        lambda t, m: _run(t, m, {**_study(t, m, _data(t)), "methods": ["\x1b[2J\x1b]0;pwned\x07lora"]}),
        "unknown method '?[2J?]0;pwned?lora'",
    ),
    (
        "a label of inf",
        lambda t, m: _run(
            t,
            m,
            _study(
                t, m, _data(t, "parquet", mutate=lambda d: d.assign(label=[float("inf")] + list(d.label[1:])))
            ),
        ),
        "label inf at row 0 is not a class",
    ),
    (
        "a separator that is not a string",
        lambda t, m: _run(t, m, _study(t, m, _data(t), data={"separator": 3})),
        "data.separator: must be a string",
    ),
    (
        "predict with a device that is not there",
        lambda t, m: (
            ["predict", str(t), "text", "--device", "cuda:7"]
            if not _cuda()
            else ["predict", str(t), "text", "--device", "tpu"]
        ),
        "device: ",
    ),
    (
        "predict on a run whose adapter is gone",
        lambda t, m: ["predict", str(_run_without_adapter(t, m)), "text"],
        "cannot be reloaded",
    ),
    (
        "compare into a missing folder",
        lambda t, m: ["compare", str(_finished(t, m)), "--out", str(t / "nowhere" / "c.md")],
        "--out",
    ),
    (
        "report where report/ is a file",
        lambda t, m: ["report", str(_report_is_a_file(t, m))],
        "cannot write the report",
    ),
    (
        "labels that name one run folder",
        lambda t, m: _run(
            t,
            m,
            {
                **_study(t, m, _data(t)),
                "methods": [{"name": "lora", "label": "café"}, {"name": "ia3", "label": "cafè"}],
            },
        ),
        "give the same run folder name",
    ),
    (
        "recommend with a malformed duration",
        lambda t, m: ["recommend", str(_finished(t, m)), "--max-train-time", "soon"],
        "--max-train-time: give a duration like 90s",
    ),
    (
        "recommend with a malformed number",
        lambda t, m: ["recommend", str(_finished(t, m)), "--min-accuracy", "high"],
        "invalid float value: 'high'",
    ),
    (
        "recommend with an accuracy over 1",
        lambda t, m: ["recommend", str(_finished(t, m)), "--min-accuracy", "90"],
        "--min-score: the study's metric is accuracy, which lies in [0, 1]",
    ),
    (
        "a study.json of the wrong shape",
        lambda t, m: ["report", str(_wrong_plan(t, m))],
        "study.json is damaged",
    ),
    (
        "Ray cluster that does not answer",
        lambda t, m: _run(
            t,
            m,
            {**_study(t, m, _data(t)), "isolation": "process"},
            ["--executor", "ray", "--address", "127.0.0.1:1"],
        ),
        "cannot reach the Ray cluster at '127.0.0.1:1'",
    ),
]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _finished(t: Path, m: Path) -> Path:
    """A study folder with one finished IA3 run."""
    from conftest import run_study
    from conftest import study as mk

    if not (t / "done" / "study.json").exists():
        run_study(mk(m, _data(t), ["ia3"], train={"epochs": 1}), t / "done")
    return t / "done"


def _run_without_adapter(t: Path, m: Path) -> Path:
    import shutil

    run = next((_finished(t, m) / "runs").iterdir())
    shutil.rmtree(run / "adapter")
    return run


def _wrong_plan(t: Path, m: Path) -> Path:
    folder = _finished(t, m)
    (folder / "study.json").write_text(json.dumps({"final_runs": "all of them", "trial_runs": [3]}))
    return folder


def _report_is_a_file(t: Path, m: Path) -> Path:
    folder = _finished(t, m)
    (folder / "report").write_text("not a folder")
    return folder


def _no_tokenizer(t: Path, m: Path) -> bool:
    """A copy of the model folder without its tokenizer files (transformers then builds one from the
    special tokens alone)."""
    dst = m.parent / "no-tok"
    if not dst.exists():
        dst.mkdir()
        for f in m.iterdir():
            if f.is_file() and not f.name.startswith(("tokenizer", "vocab", "special_tokens")):
                (dst / f.name).write_bytes(f.read_bytes())
    return True


def _spaced_label(df):
    return df.assign(label=[["neg", "pos", "pos "][i % 3] for i in range(len(df))])


def _leaky(t: Path) -> Path:
    folder = write_dataset(t / "data")
    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    test.loc[:19, "text"] = train["text"][:20].values
    test.to_parquet(folder / "test.parquet")
    return folder


def _no_train(t: Path) -> Path:
    folder = write_dataset(t / "data")
    (folder / "train.parquet").unlink()
    return folder


def _corrupt(t: Path) -> Path:
    folder = write_dataset(t / "data")
    (folder / "train.parquet").write_bytes(b"PAR1 not really")
    return folder


def _empty(t: Path) -> Path:
    (t / "empty-model").mkdir(exist_ok=True)
    return t / "empty-model"


def _pickle_model(t: Path, m: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    dst = t / "pickle-model"
    dst.mkdir(exist_ok=True)
    for f in m.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(m / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def _a_file(t: Path) -> Path:
    (t / "plainfile").write_text("x")
    return t / "plainfile"


def _a_study(t: Path, m: Path) -> Path:
    from conftest import run_study
    from conftest import study as mk

    run_study(mk(m, _data(t), ["ia3"], train={"epochs": 1}), t / "done")
    return t / "done"


def _locked(t: Path, m: Path) -> list[str]:
    from peftbench.store import StudyLock

    (t / "out").mkdir(exist_ok=True)
    lock = StudyLock(t / "out")
    lock.__enter__()  # held by "another study" until the test process ends
    _locked.held = lock
    return _run(t, m, _study(t, m, _data(t)))


def run_cli(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            cli.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("enc"))


def assert_one_error_line(code: int, err: str, expected: str) -> None:
    """Exit status 2, no traceback, and one `peftbench: error:` line that holds `expected`."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("peftbench: error: ")]
    assert code == 2, err[-1500:]
    assert "Traceback" not in err
    assert len(lines) == 1 and expected in lines[0], err[-1500:]


@pytest.mark.parametrize("case, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, setup, expected, model, tmp_path):
    code, err = run_cli(setup(tmp_path, model))
    assert_one_error_line(code, err, expected)


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            "GatedRepoError",
            "is gated on the Hugging Face Hub: ask for access at https://huggingface.co/meta-llama",
        ),
        ("RepositoryNotFoundError", "not a model on the Hugging Face Hub: check the id"),
    ],
)
def test_a_hub_model_that_will_not_load_says_why(error, expected, model, tmp_path, monkeypatch):
    """The README's `plan` example names a gated model: without access, the Hub answers 401 for its files, and
    the user is told to ask for access and log in, not that the Hub was unreachable."""
    import importlib

    import huggingface_hub.errors as hub_errors
    import transformers.utils.hub

    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])  # huggingface_hub's client
    url = "https://huggingface.co/meta-llama/Llama-3.1-8B/resolve/main/config.json"
    response = http.Response(401, request=http.Request("GET", url))

    def refused(*args, **kwargs):  # what huggingface_hub raises for the config file
        raise getattr(hub_errors, error)("401 Client Error", response=response)

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", refused)
    study = {**_study(tmp_path, model, _data(tmp_path)), "model": "meta-llama/Llama-3.1-8B"}
    code, err = run_cli(_run(tmp_path, model, study))
    assert_one_error_line(code, err, expected)
    assert not (tmp_path / "out").exists()
    with pytest.raises(OSError) as wrapped:  # wrapped once more, as another transformers version may
        try:
            transformers.utils.hub.cached_file("meta-llama/Llama-3.1-8B", "config.json")
        except OSError as e:
            raise OSError("Can't load the configuration") from e
    assert expected in models.hub_error("meta-llama/Llama-3.1-8B", wrapped.value)


def test_an_unreachable_hub_names_hf_hub_offline_unless_it_is_set(monkeypatch):
    """Without a network huggingface_hub retries each request for 23 s before a Hub id fails; the error says
    that HF_HUB_OFFLINE=1 fails at once, and says nothing of it where it is set."""
    from peftbench import models

    unreachable = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert models.hub_error("roberta-base", unreachable).endswith(
        "--model minilm (without a network, HF_HUB_OFFLINE=1 says so at once, skipping the Hub's retries)"
    )
    for value in ("1", "true"):  # as huggingface_hub reads it
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        line = models.hub_error("roberta-base", unreachable)
        assert "(HF_HUB_OFFLINE=1)" in line and line.endswith("--model minilm")


def test_catalogue_has_at_least_30_cases():
    assert len(CASES) >= 30


def test_measured_runs_survive_a_bad_rerun(model, tmp_path):
    """A study that already measured something keeps it when a later command on it fails."""
    from conftest import run_study
    from conftest import study as mk

    data = _data(tmp_path)
    (res,) = run_study(mk(model, data, ["ia3"], train={"epochs": 1}), tmp_path / "s")
    before = (tmp_path / "s" / "runs" / res["run_id"] / "result.json").read_text()
    bad = mk(model, data, ["ia3"], train={"epochs": 1})
    bad["methods"] = ["ia3", "nope"]
    code, _ = run_cli(["run", str(_write(tmp_path, bad)), "--out", str(tmp_path / "s")])
    assert code == 2
    assert (tmp_path / "s" / "runs" / res["run_id"] / "result.json").read_text() == before


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_study_that_fails_before_measuring_leaves_no_folder_it_made(command, model, tmp_path):
    """The folders a failed command created are removed; a folder the user made is kept."""
    study = _write(
        tmp_path, {**_study(tmp_path, model, _data(tmp_path)), "model": "no-such-org/no-such-model"}
    )
    code, _ = run_cli([command, str(study), "--out", str(tmp_path / "new" / "study")])
    assert code == 2 and not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    code, _ = run_cli([command, str(study), "--out", str(tmp_path / "mine")])
    assert code == 2 and (tmp_path / "mine").is_dir()


def test_long_texts_are_truncated_and_counted(model, tmp_path):
    from conftest import run_study
    from conftest import study as mk

    data = _data(tmp_path, mutate=lambda d: d.assign(text=[" ".join(["good film"] * 500)] + list(d.text[1:])))
    run_study(
        mk(model, data, ["ia3"], train={"epochs": 1}, data={"train_size": None, "validation_size": 16}),
        tmp_path / "s",
    )
    plan = json.loads((tmp_path / "s" / "study.json").read_text())
    assert plan["data"]["truncated"]["train"] + plan["data"]["truncated"]["validation"] >= 1


def test_qlora_without_4bit_support_is_skipped_and_the_study_goes_on(model, tmp_path, monkeypatch):
    from conftest import run_study
    from conftest import study as mk

    from peftbench import models

    monkeypatch.setattr(
        models, "quantization_supported", lambda device: "bitsandbytes is not usable here (test)"
    )
    res = run_study(mk(model, _data(tmp_path), ["qlora", "ia3"], train={"epochs": 1}), tmp_path / "s")
    assert res[0]["status"] == "skipped" and "bitsandbytes is not usable" in res[0]["error"]
    assert res[1]["status"] == "success"


def test_labels_cannot_escape_the_study_folder(model, tmp_path):
    from conftest import run_study
    from conftest import study as mk

    (res,) = run_study(
        mk(model, _data(tmp_path), [{"name": "ia3", "label": "../../escape"}], train={"epochs": 1}),
        tmp_path / "s",
    )
    run_dir = (tmp_path / "s" / "runs" / res["run_id"]).resolve()
    assert run_dir.parent == (tmp_path / "s" / "runs").resolve() and run_dir.exists()
    assert not (tmp_path / "escape").exists()


if __name__ == "__main__":  # print the catalogue: case | message
    import tempfile

    os.environ["HF_HUB_OFFLINE"] = "1"
    base = Path(tempfile.mkdtemp())
    m = make_tiny_encoder(base / "enc")
    print("| # | case | exit | message |\n| --- | --- | --- | --- |")
    for i, (case, setup, _) in enumerate(CASES, 1):
        t = base / f"c{i}"
        t.mkdir()
        code, err = run_cli(setup(t, m))
        msg = err.strip().splitlines()[-1].replace("peftbench: error: ", "").replace(str(t), "…")
        print(f"| {i} | {case} | {code} | {msg.replace('|', '/')} |")


def test_a_damaged_checkpoint_or_token_cache_is_moved_aside_and_the_run_goes_on(model, tmp_path, capsys):
    from conftest import run_study
    from conftest import study as mk

    raw = mk(model, _data(tmp_path), ["ia3"], train={"epochs": 1})
    (first,) = run_study(raw, tmp_path / "s")
    run_dir = tmp_path / "s" / "runs" / first["run_id"]
    (run_dir / "result.json").unlink()  # the run is redone ...
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")  # ... over a damaged checkpoint
    cache = next((tmp_path / "s" / ".cache").glob("tokens-*.npz"))
    cache.write_bytes(b"PK not a zip")
    capsys.readouterr()
    (again,) = run_study(raw, tmp_path / "s")
    err = capsys.readouterr().err
    assert again["status"] == "success", again["error"]
    assert again["metrics"]["test_accuracy"] == first["metrics"]["test_accuracy"]
    assert "token cache" in err and "checkpoint" in err and err.count("moved to") == 2
    assert list(run_dir.glob("checkpoint.pt.corrupt-*")) and list(cache.parent.glob("*.corrupt-*"))


def test_a_dollar_label_does_not_break_the_plots(model, tmp_path):
    from conftest import run_study
    from conftest import study as mk

    from peftbench import report

    run_study(
        mk(model, _data(tmp_path), [{"name": "ia3", "label": "$x^2$ and $"}], train={"epochs": 1}),
        tmp_path / "s",
    )
    paths = report.write_report(tmp_path / "s")
    assert paths["html"].exists() and "$x^2$ and $" in paths["markdown"].read_text()


def test_a_study_name_never_leaves_the_runs_folder(model, tmp_path, monkeypatch):
    from conftest import study as mk

    monkeypatch.chdir(tmp_path)
    raw = {**mk(model, _data(tmp_path), ["ia3"], train={"epochs": 1}), "name": "../../escaped"}
    code, err = run_cli(["run", str(_write(tmp_path, raw)), "--no-report"])
    assert code == 0, err[-800:]
    assert (tmp_path / "runs" / "escaped" / "study.json").exists()
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path.parent.parent / "escaped").exists()
