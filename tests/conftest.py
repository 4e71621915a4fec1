"""Shared fixtures: tiny models built from configs (no download) and small labelled datasets on disk."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFTBENCH_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_IMDB = Path(os.environ.get("PEFTBENCH_DATA", REPO.parent / "shared" / "data" / "imdb"))
# Real IMDb reviews: the full shared copy where it is beside the checkout, else the sample in the package.
IMDB = (
    SHARED_IMDB
    if (SHARED_IMDB / "train.parquet").exists()
    else REPO / "src" / "peftbench" / "sample_data" / "imdb"
)

POS = ["good", "great", "fine", "superb", "lovely", "brilliant", "enjoyable", "moving"]
NEG = ["bad", "awful", "boring", "poor", "dull", "terrible", "weak", "messy"]
NEUTRAL = [
    "the",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "was",
    "and",
    "a",
    "very",
    "story",
    "ending",
    "music",
    "it",
    "this",
    "of",
    "cast",
    "really",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_rows(n: int, seed: int, classes: int = 2, string_labels: bool = False) -> pd.DataFrame:
    """Texts whose label is decided by their sentiment words: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % classes
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 20))]
        cue = POS if y == 1 else NEG if y == 0 else ["plot", "scene", "story"]
        for _ in range(3):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
        rows.append({"text": " ".join(words), "label": (["neg", "pos", "mixed"][y] if string_labels else y)})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def write_dataset(folder: Path, fmt: str = "parquet", n_train: int = 160, n_test: int = 80, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        df = make_rows(n, seed, **kw)
        path = folder / f"{split}.{fmt}"
        if fmt == "parquet":
            df.to_parquet(path)
        elif fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_json(path, orient="records", lines=True)
    return folder


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = SPECIAL + sorted(set(POS + NEG + NEUTRAL))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # The vocabulary itself, not vocab_file: transformers 5.2x builds a 5-token vocabulary from the special
    # tokens alone when given the file, and every word becomes [UNK].
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok.convert_tokens_to_ids("good") == vocab.index("good")
    tok.save_pretrained(folder)
    return tok


def make_tiny_encoder(folder: Path, dropout: bool = True) -> Path:
    """A 2-layer BERT (hidden 64: bitsandbytes quantizes in blocks of 64) saved as a base model: the
    classifier is newly initialised, as for a real one. Without dropout, two ways of running the same steps
    (graphed and eager, one process and two) must compute the same numbers."""
    from transformers import BertConfig, BertModel

    tok = _tokenizer(folder)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        **({} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    return folder


def make_tiny_decoder(folder: Path) -> Path:
    """A 2-layer Llama-style decoder (no pad token in its config) for `LlamaForSequenceClassification`."""
    from transformers import LlamaConfig, LlamaModel

    tok = _tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=None,
    )
    import torch

    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def no_dropout_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=False)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@functools.cache
def benchmark(name: str):
    """The script `benchmarks/NAME.py` as a module (loaded once per test process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def study(model: Path | str, data_dir: Path, methods, **over) -> dict:
    """A small study dict on the tiny data, run inline (one process) for speed."""
    s = {
        "model": str(model),
        "data": {"path": str(data_dir), "train_size": 120, "validation_size": 24, "test_size": 60},
        "methods": methods,
        "train": {"epochs": 2, "batch_size": 16, "max_length": 32, "eval_batch_size": 32},
        "seeds": [0],
        "isolation": "inline",
        "report": False,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(s.get(k), dict):
            s[k] = {**s[k], **v}
        else:
            s[k] = v
    return s


def fresh_python(code: str, timeout: float = 300) -> str:
    """The stdout of `code` run by a fresh interpreter, with this folder on its path (for these helpers); the
    test fails if it exits non-zero. For what a process imports, which this one has imported already."""
    import subprocess
    import sys

    path = f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    out = subprocess.run([sys.executable, "-c", path + code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-800:]
    return out.stdout


def run_study(raw: dict, out: Path) -> list[dict]:
    from peftbench import config
    from peftbench.runner import Study

    return Study(config.validate(raw), out).run()


def set_up_recipe(raw: dict, tmp_path: Path, pick=None):
    """A run's Recipe set up (model, optimizer, memory plan, layout) and not trained: the study's first final
    run, or the spec `pick(study)` returns."""
    from peftbench import config, data as data_mod, train
    from peftbench.runner import Study

    s = Study(config.validate(raw), tmp_path / "s")
    s.out.mkdir(parents=True)
    s.prepare()
    spec = pick(s) if pick else s.final_specs({})[0]
    (tmp_path / "run").mkdir()
    recipe = train.Recipe(spec, data_mod.Tokenized.load(s.tok_file), tmp_path / "run", progress=False)
    recipe.setup()
    return recipe
