"""Data: load a labelled text dataset, map labels, draw seeded stratified splits, tokenize once.

Local folders hold `train.*` and `test.*` files (parquet, csv, jsonl or json); a hub dataset is read
with `datasets.load_dataset`. The train split yields the training subset and a disjoint validation
subset; the test split is only ever used for the final score.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError, offline_hint

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}
# The share of a single data file carved out as the test split when data.test_size is not given.
SINGLE_FILE_TEST_SHARE = 0.2
SPLITS = ("train", "validation", "test")


# Joins the two texts of a sentence pair (`text_column: [a, b]`) into one text for the splits, the overlap
# check and TF-IDF; `encode` hands the tokenizer the two parts, for its own pair encoding.
PAIR = "\x1f"


def is_pair(data_spec: dict) -> bool:
    tc = data_spec.get("text_column")
    return isinstance(tc, list) and len(tc) == 2


def encode(tokenizer, texts: list[str], max_length: int, pair: bool) -> list[list[int]]:
    """Token ids of each text; a pair as the tokenizer encodes `tokenizer(a, b)` (its separator, the longer
    side truncated first)."""
    if not pair:
        return tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    a, b = zip(*(t.split(PAIR, 1) for t in texts)) if texts else ((), ())
    return tokenizer(list(a), list(b), truncation="longest_first", max_length=max_length, padding=False)[
        "input_ids"
    ]


@dataclass
class StudyData:
    """The three splits of a study: texts, label ids and the row index each item came from."""

    texts: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]  # row numbers in the source split (train/validation: train file)
    label_names: list[str]
    source: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """What the runs see of the data: every text, label and row of each split (content, not paths)."""
        if "_fingerprint" in self.source:
            return self.source["_fingerprint"]
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(s.encode())
            h.update(np.asarray(self.rows[s], dtype=np.int64).tobytes())
            lab = np.asarray(self.labels[s])
            h.update((lab.astype(np.int64) if lab.dtype.kind in "iub" else lab.astype(np.float64)).tobytes())
            for t in self.texts[s]:
                h.update(t.encode("utf-8", "surrogatepass"))
                h.update(b"\x00")
        h.update("\x00".join(self.label_names).encode())
        h.update(str(self.source.get("origin")).encode())
        self.source["_fingerprint"] = h.hexdigest()[:16]
        return self.source["_fingerprint"]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.texts[s]) for s in SPLITS}


def _find_file(folder: Path, split: str) -> Path:
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and p.stem == split and p.suffix in FORMATS]
    if not found:
        have = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())[:8]) or "nothing"
        raise UserError(
            f"data.path {folder}: no {split} file ({split}.parquet, .csv, .jsonl or .json) "
            f"found (it holds: {have})"
        )
    if len(found) > 1:
        raise UserError(
            f"data.path {folder}: more than one {split} file ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0]


def _read_file(path: Path, label_column: str | None = None, columns: list[str] | None = None):
    import pandas as pd

    fmt = FORMATS[path.suffix]
    try:
        if path.stat().st_size == 0:
            raise UserError(f"data file {path} is empty; put the labelled rows in it")
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "csv":
            # Labels as written: '01' and '1' are two classes, not one (ints are restored in _raw_labels).
            dtype = {label_column: str} if label_column else None
            sep = "\t" if path.suffix == ".tsv" else ","
            # data.columns: a file without header
            header = {"header": None, "names": columns} if columns else {}
            return pd.read_csv(
                path, encoding="utf-8", keep_default_na=False, na_values=[""], dtype=dtype, sep=sep, **header
            )
        return pd.read_json(path, lines=path.suffix == ".jsonl", encoding="utf-8")
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file {path} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8"
        ) from None
    except Exception as e:  # pyarrow / pandas parser errors are many and deep
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"data file {path} cannot be read as {fmt}: {first}") from None


def _load_local(spec: dict) -> tuple[dict, list[str] | None]:
    folder = Path(spec["path"])
    if not folder.exists():
        raise UserError(
            f"data.path {folder} not found; pass --data DIR or set $PEFTBENCH_DATA to a folder "
            f"holding train.parquet and test.parquet (or .csv/.tsv/.jsonl), or give one such file"
        )
    label = spec["label_column"] if isinstance(spec["label_column"], str) else None
    if folder.is_file():  # one file: the test split is carved out of it (load)
        if folder.suffix not in FORMATS:
            raise UserError(
                f"data.path {folder}: not a data file ({', '.join(FORMATS)}); give one, or the folder "
                "that holds train and test files"
            )
        return {"train": _read_file(folder, label, spec.get("columns")), "test": None}, None
    files = {s: _find_file(folder, spec[f"{s}_split"]) for s in ("train", "test")}
    return {s: _read_file(f, label, spec.get("columns")) for s, f in files.items()}, None


def _load_hub(spec: dict) -> tuple[dict, list[str] | None]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data.name needs the `datasets` package; pip install datasets, or use data.path"
        ) from None
    try:
        ds = {
            s: datasets.load_dataset(spec["name"], spec["config"], split=spec[f"{s}_split"])
            for s in ("train", "test")
        }
    except Exception as e:
        raise UserError(
            f"data.name '{spec['name']}' could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''}); offline, use data.path with a local "
            f"copy (--data DIR){offline_hint()}"
        ) from None
    names = None
    feat = ds["train"].features.get(spec["label_column"])
    if feat is not None and hasattr(feat, "names"):
        names = list(feat.names)
    return {s: d.to_pandas() for s, d in ds.items()}, names


def _texts(df, spec: dict, split: str) -> list[str]:
    cols = spec["text_column"] if isinstance(spec["text_column"], list) else [spec["text_column"]]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(
            f"data.text_column: column {missing[0]!r} not in the {split} file (columns: "
            f"{', '.join(map(str, df.columns))[:200]}); set data.text_column{_headerless_hint(df)}"
        )
    parts = []
    for c in cols:
        col = df[c]
        bad = [i for i, v in enumerate(col) if not isinstance(v, str)]
        if bad:
            raise UserError(
                f"data: {len(bad)} {split} rows have a missing or non-text {c!r} (first at row {bad[0]}); "
                f"fill or drop them"
            )
        parts.append(list(col))
    for c, part in zip(cols, parts if len(parts) == 2 else []):
        empty = [i for i, t in enumerate(part) if not t.strip()]
        if empty:
            raise UserError(
                f"data: {len(empty)} {split} rows have an empty {c!r} (first at row {empty[0]}); a sentence "
                "pair needs both texts: fill or drop them"
            )
    sep = PAIR if len(parts) == 2 else spec["separator"]
    texts = [sep.join(t) for t in zip(*parts)] if len(parts) > 1 else parts[0]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UserError(
            f"data: {len(empty)} {split} rows have an empty text (first at row {empty[0]}); "
            f"drop them or fill them"
        )
    return texts


def _headerless_hint(df) -> str:
    """A hint when the 'column names' look like a data row: a file without a header row."""
    names = [str(c) for c in df.columns]
    if any(len(n) > 40 or " " in n.strip() or re.fullmatch(r"-?[0-9.]+", n) for n in names):
        return (
            f"; the file seems to have no header row (its first row reads {names[:3]}): name the columns "
            "with data.columns: [...], e.g. [label, title, description]"
        )
    return ""


def _raw_labels(df, spec: dict, split: str, task: str = "classification") -> list:
    """The labels as written, checked for the task: classes (ints or strings), scores (floats) or label
    sets (tuples)."""
    cols = spec["label_column"] if isinstance(spec["label_column"], list) else [spec["label_column"]]
    for col in cols:
        if col not in df.columns:
            raise UserError(
                f"data.label_column: column {col!r} not in the {split} file (columns: "
                f"{', '.join(map(str, df.columns))[:200]}); set data.label_column{_headerless_hint(df)}"
            )
    if task == "regression":
        return _scores(list(df[cols[0]]), cols[0], split)
    if task == "multi_label":
        if len(cols) > 1:
            return _sets_from_columns(df, cols, split)
        return _label_sets(list(df[cols[0]]), cols[0], spec["label_separator"], split)
    return _classes(list(df[cols[0]]), cols[0], split)


def _scores(values: list, col: str, split: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v) if not isinstance(v, (bool, np.bool_)) and v is not None else math.nan
        except (TypeError, ValueError):
            raise UserError(
                f"data: {split} label {v!r} at row {i} is not a number; task: regression needs numeric "
                f"scores in {col!r} (or use task: classification)"
            ) from None
        if not math.isfinite(f):
            raise UserError(f"data: {split} row {i} has no finite score in {col!r} ({v!r}); fill or drop it")
        out.append(f)
    return out


def _label_sets(values: list, col: str, sep: str, split: str) -> list[tuple]:
    """Multi-label rows: lists (Parquet, JSON) or delimited strings ('sports,politics'; an empty cell is no
    label)."""
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):  # an empty cell of a CSV: no label
            items = []
        elif isinstance(v, str):
            items = [x.strip() for x in v.split(sep) if x.strip()]
        elif isinstance(v, (list, tuple, np.ndarray)):
            items = [x.item() if isinstance(x, np.generic) else x for x in v]
        elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            items = [int(v)]  # one label
        else:
            raise UserError(
                f"data: {split} label {v!r} at row {i} is not a label set; task: multi_label needs a list or "
                f"a {sep!r}-separated string in {col!r}, or several 0/1 columns"
            )
        bad = [x for x in items if not isinstance(x, (int, str)) or isinstance(x, bool)]
        if bad:
            raise UserError(
                f"data: {split} row {i} has a label {bad[0]!r}; labels must be integers or strings"
            )
        out.append(tuple(sorted(set(items), key=str)))
    return out


def _sets_from_columns(df, cols: list[str], split: str) -> list[tuple]:
    """Multi-label rows from several 0/1 columns: the set of columns holding 1."""
    read = {c: _zero_one(df[c]) for c in cols}
    for c, vals in read.items():
        if not set(vals) <= {0, 1}:
            raise UserError(
                f"data: {split} column {c!r} holds {sorted(set(vals) - {0, 1}, key=str)[:3]}; each label "
                "column of a multi_label task must hold 0 or 1"
            )
    flags = np.column_stack(list(read.values())).astype(bool)
    return [tuple(c for c, f in zip(cols, row) if f) for row in flags]


def _zero_one(col) -> list:
    """A column's values with 0/1 written as text, bools or floats read as ints where they are whole."""
    out = []
    for v in col:
        if isinstance(v, str) and v.strip() in ("0", "1"):
            v = int(v)
        elif isinstance(v, (bool, np.bool_, np.integer)) or (
            isinstance(v, (float, np.floating)) and v in (0, 1)
        ):
            v = int(v)
        out.append(v)
    return out


def _classes(values: list, col: str, split: str) -> list:
    values = _ints_if_all_canonical(values)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if isinstance(v, (np.integer,)):
            v = int(v)
        if isinstance(v, (float, np.floating)):
            if math.isinf(v):
                raise UserError(
                    f"data: {split} label {v} at row {i} is not a class; fix the label column {col!r}"
                )
            if math.isnan(v):
                raise UserError(f"data: {split} row {i} has no label (NaN in {col!r}); fill or drop it")
            if v != int(v):
                raise UserError(
                    f"data: {split} label {v} at row {i} is not a class (looks like regression); "
                    f"set task: regression for scores, or use integer or string labels"
                )
            v = int(v)
        if v is None:
            raise UserError(f"data: {split} row {i} has no label in {col!r}; fill or drop it")
        if not isinstance(v, (int, str)):
            raise UserError(
                f"data: {split} label at row {i} is a {type(v).__name__}; labels must be integers or strings"
            )
        out.append(v)
    kinds = {type(v) for v in out}
    if len(kinds) > 1:
        raise UserError(f"data: the {split} labels mix integers and strings; use one type for {col!r}")
    if kinds == {int} and any(v < 0 for v in out):
        neg = next(i for i, v in enumerate(out) if v < 0)
        raise UserError(
            f"data: {split} label {out[neg]} at row {neg} is negative (unlabelled rows?); "
            f"labels must be >= 0: drop unlabelled rows"
        )
    return out


def _ints_if_all_canonical(values: list) -> list:
    """Labels read as text are integers when every one is an integer written plainly ('3', '-1'); with one
    that is not ('03', 'pos') all stay text, so labels that differ as written stay different classes."""
    if values and all(isinstance(v, str) and re.fullmatch(r"-?(0|[1-9][0-9]*)", v) for v in values):
        return [int(v) for v in values]
    return values


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a seeded sample of `n` items whose class shares match `labels` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[j] += 1
    take = np.minimum(take, counts)
    picked = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.permutation(idx)[:k])
    out = np.concatenate(picked) if picked else np.array([], dtype=int)
    return np.sort(rng.permutation(out))


# Share of test texts that may also be training texts before a study is refused (data.allow_overlap).
MAX_OVERLAP = 0.05
# Share of all texts that may carry two labels before a warning.
MAX_LABELLED_TWICE = 0.01
# Data files of up to this many texts are checked whole for texts given two labels (IMDb's 50,000 in 0.65 s
# on a 2-core CPU, 2026-12-05); larger ones, in their sampled splits only.
MAX_KEYED_TEXTS = 200_000
# A word in at least LABEL_WORD_SHARE of one class's training texts (of at least LABEL_WORD_MIN_TEXTS) and
# in at most LABEL_WORD_ELSEWHERE of the other classes' tells the classes apart by itself: often the label
# written into the texts (a template, a rating, a source tag). Checked on up to LABEL_WORD_TEXTS texts (0.25 s
# for 2,000 IMDb reviews on a 2-core CPU, 2026-12-07). In the training splits of IMDb, SST-2, MRPC and RTE no
# word comes near: the most telling, "10" in IMDb, is in 48% of the positive reviews and 13% of the negative
# ones (2,000 texts of each split, 2026-12-05).
LABEL_WORD_SHARE, LABEL_WORD_ELSEWHERE, LABEL_WORD_MIN_TEXTS, LABEL_WORD_TEXTS = 0.8, 0.1, 20, 2000
WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's CountVectorizer's default token_pattern


def load(spec: dict, task: str = "classification") -> StudyData:
    """Load, check and split the data described by the study's `data` section, labelled for `task`."""
    if spec["train_split"] == spec["test_split"] and not spec.get("allow_overlap"):
        raise UserError(
            f"data: train_split and test_split are both {spec['train_split']!r}: scores would be measured "
            "on training rows; name two splits, or set data.allow_overlap: true to do it knowingly"
        )
    frames, hub_names = _load_hub(spec) if spec.get("name") else _load_local(spec)
    file_rows = None
    if frames["test"] is None:
        frames, file_rows = _carve_test(frames["train"], spec, task)
    texts = {s: _texts(frames[s], spec, s) for s in ("train", "test")}
    raw = {s: _raw_labels(frames[s], spec, s, task) for s in ("train", "test")}
    for s in ("train", "test"):
        if not texts[s]:
            raise UserError(f"data: the {s} file has no rows")
    labels, names, values = _encode_labels(raw, task, spec, hub_names)
    strata = {s: _strata(labels[s], task) for s in ("train", "test")}

    rng = np.random.default_rng(spec["seed"])
    n_strata = len(np.unique(strata["train"]))
    tr, va, origin = _train_validation(strata["train"], spec, n_strata, rng)
    n_test = spec["test_size"] if file_rows is None else None  # a carved test split has its size already
    if isinstance(n_test, float):
        n_test = max(n_strata, round(n_test * len(texts["test"])))
    if n_test is not None and n_test > len(texts["test"]):
        raise UserError(
            f"data.test_size {n_test} is larger than the test split ({len(texts['test'])} rows); lower it"
        )
    te = stratified_sample(strata["test"], n_test, rng) if n_test else np.arange(len(texts["test"]))
    _check_labels(
        {"train": labels["train"][tr], "validation": labels["train"][va], "test": labels["test"][te]}, task
    )

    pick = {"train": ("train", tr), "validation": ("train", va), "test": ("test", te)}
    split_texts = {s: [texts[src][i] for i in idx] for s, (src, idx) in pick.items()}
    split_labels = {s: labels[src][idx] for s, (src, idx) in pick.items()}
    split_keys, files = _text_keys((texts, labels), pick, (split_texts, split_labels))
    rows = {s: np.asarray(idx, dtype=np.int64) for s, (_, idx) in pick.items()}
    if file_rows is not None:  # rows of the one file, for every split
        rows = {s: file_rows[src][rows[s]] for s, (src, _) in pick.items()}
        origin += f"; test split carved out of the one data file ({len(file_rows['test'])} rows)"
    return StudyData(
        texts=split_texts,
        labels=split_labels,
        rows=rows,
        label_names=names,
        source={
            "path": spec.get("path"),
            "name": spec.get("name"),
            "origin": origin,
            "label_values": values,
            "overlap": check_overlap(split_keys, files, task, spec.get("allow_overlap", False)),
            "label_words": label_words(split_texts["train"], split_labels["train"], task, names),
        },
    )


def _text_keys(whole: tuple[dict, dict], pick: dict, splits: tuple[dict, dict]) -> tuple[dict, tuple]:
    """The splits' texts as `_dedup_key`s, and the keys and labels over which texts given two labels are
    counted: the whole files' (texts and labels, `whole`) up to MAX_KEYED_TEXTS texts, else the splits'."""
    texts, labels = whole
    if sum(map(len, texts.values())) > MAX_KEYED_TEXTS:
        keys = {s: [_dedup_key(t) for t in v] for s, v in splits[0].items()}
        return keys, (keys, splits[1])
    keys = {s: [_dedup_key(t) for t in texts[s]] for s in ("train", "test")}
    return {s: [keys[src][i] for i in idx] for s, (src, idx) in pick.items()}, (keys, labels)


def _encode_labels(raw: dict, task: str, spec: dict, hub_names) -> tuple[dict, list[str], list | None]:
    """Label arrays per split (class ids; float scores; 0/1 rows over the label set), the names of the
    classes, score or labels, and the values as written (classes and label sets)."""
    if task == "regression":
        labels = {s: np.asarray(v, dtype=np.float32) for s, v in raw.items()}
        col = spec["label_column"]
        return labels, [str(col)], None
    if task == "multi_label":
        _refuse_twins(set().union(*raw["train"], *raw["test"]))
        values = sorted(set().union(*raw["train"]), key=str)
        if not values:
            raise UserError("data: no train row has a label: the label set is empty; fix the label column")
        _refuse_unseen(raw["test"], values, lambda v: v)
        names = _label_names(values, spec.get("label_names"), hub_names)
        index = {v: j for j, v in enumerate(values)}
        labels = {}
        for s, sets in raw.items():
            m = np.zeros((len(sets), len(values)), dtype=np.float32)
            for i, row in enumerate(sets):
                m[i, [index[v] for v in row]] = 1
            labels[s] = m
        return labels, names, values
    _refuse_twins(set(raw["train"]) | set(raw["test"]))
    values = sorted(set(raw["train"]))
    if len(values) < 2:
        raise UserError(
            f"data: the train split has only one class ({values[0]!r}); a classifier needs at least two"
        )
    if len(values) > max(50, len(raw["train"]) // 2):
        raise UserError(
            f"data: '{spec['label_column']}' has {len(values):,} distinct values in {len(raw['train']):,} "
            "training rows: that is an id, a text or a score, not classes; set data.label_column to the "
            "column of classes (or task: regression for scores)"
        )
    _refuse_unseen(raw["test"], values, lambda v: [v])
    names = _label_names(values, spec.get("label_names"), hub_names)
    to_id = {v: i for i, v in enumerate(values)}
    labels = {s: np.array([to_id[v] for v in r], dtype=np.int64) for s, r in raw.items()}
    return labels, names, values


def _refuse_twins(values: set) -> None:
    """Labels written two ways, differing only in the spaces around them ('pos' and 'pos '), would train as
    two classes: an error, not a silent extra class."""
    seen: dict = {}
    for v in sorted((v for v in values if isinstance(v, str)), key=str):
        if v.strip() in seen:
            raise UserError(
                f"data: the labels {seen[v.strip()]!r} and {v!r} differ only in spaces around them, so they "
                "would be two classes; strip the spaces in the label column"
            )
        seen[v.strip()] = v


def _refuse_unseen(test_labels: list, values: list, members) -> None:
    unseen = sorted({v for x in test_labels for v in members(x)} - set(values), key=str)
    if unseen:
        raise UserError(f"data: test labels {unseen[:5]} never occur in train; fix the labels or the files")


def _strata(labels: np.ndarray, task: str) -> np.ndarray:
    """What sampling keeps the shares of: the class; a score's quintile; the label set (as a code per
    distinct set, or rows of 0/1 per label), where sets held by under 1% of the rows (or one row) share one
    stratum."""
    if task == "classification":
        return labels
    if task == "regression":
        return np.searchsorted(np.quantile(labels, [0.2, 0.4, 0.6, 0.8]), labels, side="right")
    sets = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1) if labels.ndim == 2 else labels
    counts = np.bincount(sets)
    return np.where(counts[sets] >= max(2, 0.01 * len(sets)), sets, -1)


def _check_labels(splits: dict[str, np.ndarray], task: str) -> None:
    """Labels each split needs: two classes to train on; scores that vary, to train on and to score with (a
    correlation with constant scores is undefined: it would read as 0 for every method)."""
    if task == "classification" and len(np.unique(splits["train"])) < 2:
        raise UserError("data: the training subset holds one class only; raise data.train_size")
    for split, y in splits.items():
        if task != "regression" or not len(y) or np.ptp(y) > 0:
            continue
        if split == "train":
            raise UserError(f"data: every training score is {y[0]}; regression needs scores that vary")
        fix = "raise data.validation_size" if split == "validation" else "use a test split that varies"
        raise UserError(
            f"data: every {split} score is {y[0]:g}: a correlation with constant scores is undefined; " + fix
        )


def _train_validation(labels: np.ndarray, spec: dict, n_classes: int, rng) -> tuple:
    """The training subset and the validation subset (disjoint, stratified) of the train split's rows, and
    how validation was drawn."""
    pool = len(labels)
    n_train = spec["train_size"] or None
    vs = spec["validation_size"]
    n_val = vs if isinstance(vs, int) else max(n_classes, round(vs * (n_train or pool)))
    if n_train is not None and n_train + n_val <= pool:
        # Enough rows: the training subset keeps its full size and validation comes from the rest.
        tr = stratified_sample(labels, n_train, rng)
        rest = np.setdiff1d(np.arange(pool), tr)
        va = rest[stratified_sample(labels[rest], n_val, rng)]
        return tr, va, "validation drawn from train-split rows outside the training subset"
    if n_train is not None and n_train > pool:
        raise UserError(f"data.train_size {n_train} is larger than the train split ({pool} rows); lower it")
    base = stratified_sample(labels, n_train or pool, rng)
    if n_val >= len(base):
        raise UserError(f"data.validation_size {n_val} leaves no training rows; lower it")
    va = base[stratified_sample(labels[base], n_val, rng)]
    return np.setdiff1d(base, va), va, "validation carved out of the training subset"


def _carve_test(df, spec: dict, task: str) -> tuple[dict, dict]:
    """One data file: a seeded, stratified test split (data.test_size rows, or that fraction; a fifth when not
    given) and the rest for training; returns the frames and each one's row numbers in the file."""
    raw = _raw_labels(df, spec, "data", task)
    if task == "regression":
        codes = _strata(np.asarray(raw, dtype=np.float64), task)
    else:  # classes, or label sets
        codes = _strata(
            np.unique([str(sorted(v) if task == "multi_label" else v) for v in raw], return_inverse=True)[1],
            task,
        )
    size = spec.get("test_size") or SINGLE_FILE_TEST_SHARE
    n = size if isinstance(size, int) else max(len(set(codes)), round(size * len(raw)))
    if n >= len(raw):
        raise UserError(f"data.test_size {size} leaves no training rows in the {len(raw)}-row file; lower it")
    te = stratified_sample(codes, n, np.random.default_rng([spec["seed"], 1]))
    tr = np.setdiff1d(np.arange(len(raw)), te)
    frames = {"train": df.iloc[tr].reset_index(drop=True), "test": df.iloc[te].reset_index(drop=True)}
    return frames, {"train": tr, "test": te}


def _label_names(values: list, given, hub_names: list[str] | None) -> list[str]:
    """Display names of the classes (in label-id order): data.label_names as a list in the labels' sorted
    order
    or a map from label to name; else the hub's names; else the labels themselves."""
    if isinstance(given, list):
        if len(given) != len(values):
            raise UserError(
                f"data.label_names: {len(given)} names for {len(values)} classes ({values[:10]}); give "
                "one name per class, in that order, or a map {label: name}"
            )
        return [str(n) for n in given]
    if isinstance(given, dict):
        return [str(given.get(v, given.get(str(v), v))) for v in values]
    if hub_names and all(isinstance(v, int) for v in values) and max(values) < len(hub_names):
        return [hub_names[v] for v in values]
    return [str(v) for v in values]


def readable_labels(labels: np.ndarray, names: list[str]) -> list:
    """Labels as a reader wants them: the class name, the score, or the list of label names."""
    if labels.ndim == 2:
        return [[names[j] for j in np.flatnonzero(row)] for row in labels]
    if labels.dtype.kind == "f":
        return [float(v) for v in labels]
    return [names[i] for i in labels]


# A test split where one class makes up at least this share lets a constant answer score that much
# accuracy: a study ranked by accuracy says so, at the start and in its report.
CONSTANT_ANSWER_NOTE = 0.6


def constant_answer(task: str, metric: str, test_labels, label_names: list) -> str | None:
    """Where accuracy ranks a classification study whose test split one class dominates: what a constant
    answer would score, and what to rank by instead (None otherwise)."""
    if task != "classification" or metric != "accuracy" or not len(test_labels):
        return None
    counts = np.bincount(np.asarray(test_labels, dtype=np.int64))
    share = counts.max() / counts.sum()
    if share < CONSTANT_ANSWER_NOTE:
        return None
    top = int(counts.argmax())
    name = label_names[top] if top < len(label_names) else top
    return (
        f"the test split is {share:.0%} class {name}: answering {name} for every text scores "
        f"{share:.3f} accuracy; read accuracies against that, or rank by macro_f1 (`metric: macro_f1`)"
    )


def check_overlap(keys: dict[str, list[str]], files: tuple[dict, dict], task: str, allowed: bool) -> dict:
    """From the splits' texts as `_dedup_key`s (duplicates up to case and whitespace, which an uncased
    tokenizer does not see and a copy often gains): test texts that are also training or validation texts,
    and validation texts that are also training texts; from the whole data files (their keys and labels,
    `files`), texts given two labels. Counted always; test overlap over MAX_OVERLAP of the test set is a
    one-line error unless the study allows it (the rest are warned of: `repeated_text_notes`)."""
    train = set(keys["train"])
    seen = train | set(keys["validation"])
    n = sum(k in seen for k in keys["test"])
    share = n / len(keys["test"]) if keys["test"] else 0.0
    if share > MAX_OVERLAP and not allowed:
        raise UserError(
            f"data: {n} of the {len(keys['test'])} test texts ({share:.0%}) are also training texts: "
            "scores would be inflated; remove the duplicates, or set data.allow_overlap: true"
        )
    file_keys, file_labels = files
    return {
        "test_texts_also_in_train": n,
        "share_of_test": share,
        "validation_texts_also_in_train": sum(k in train for k in keys["validation"]),
        "texts_labelled_twice": 0 if task == "regression" else _labelled_twice(file_keys, file_labels),
        "texts_checked_for_labels": sum(len(k) for k in file_keys.values()),
    }


def _labelled_twice(keys: dict[str, list[str]], labels: dict) -> int:
    """Distinct texts (over the splits or files of `keys`) that carry more than one label: no model can
    answer them all."""
    seen: dict[str, set] = {}
    for s, split_keys in keys.items():
        for k, y in zip(split_keys, labels[s]):
            seen.setdefault(k, set()).add(np.asarray(y).tobytes())
    return sum(len(v) > 1 for v in seen.values())


def repeated_text_notes(overlap: dict, sizes: dict) -> list[str]:
    """Warnings about repeated texts: validation texts that are also training texts, over MAX_OVERLAP of
    the validation split (validation scores choose the learning rates and epochs), and texts given two
    labels, over MAX_LABELLED_TWICE of the texts checked (a label column that is not the one meant, or
    files joined from sources that code labels otherwise)."""
    notes = []
    n, n_val = overlap.get("validation_texts_also_in_train") or 0, sizes.get("validation") or 0
    if n_val and n / n_val > MAX_OVERLAP:
        notes.append(
            f"{n} of the {n_val} validation texts ({n / n_val:.0%}) are also training texts (the training "
            "data repeats texts): validation scores, which choose learning rates and epochs, favour "
            "memorising; remove the repeats from the training data"
        )
    # over the texts checked (the data files, up to MAX_KEYED_TEXTS); before 2026-12-05, over the splits
    twice, total = (
        overlap.get("texts_labelled_twice") or 0,
        overlap.get("texts_checked_for_labels") or sum(sizes.values()),
    )
    if total and twice / total > MAX_LABELLED_TWICE:
        notes.append(
            f"{twice} texts appear with two or more different labels ({twice / total:.0%} of the "
            f"{total:,} texts in the data): no method can answer them all; check that data.label_column is "
            "the one meant, and that files joined from several sources code their labels alike"
        )
    return notes


def data_notes(task: str, metric: str, test_labels, label_names, overlap: dict, sizes: dict, words) -> list:
    """The warnings about a study's data, which its start and its report both give: a test split one class
    dominates, repeated texts, words that give the label away, class names alike."""
    notes = (
        constant_answer(task, metric, test_labels, label_names),
        *repeated_text_notes(overlap, sizes),
        label_word_note(words),
        label_name_note(label_names),
    )
    return [n for n in notes if n]


def label_words(texts: list[str], labels, task: str, names: list[str]) -> list[dict]:
    """Words that tell one class's training texts from the others' by themselves (LABEL_WORD_SHARE), the
    most common first, at most 3 per class; classification only. Words as scikit-learn's CountVectorizer
    finds them by default (WORD, lowercased), without importing scikit-learn: the study's main process
    needs nothing else of it, and without the import `load` took 0.6-0.9 s instead of 1.9-2.4 s in the
    starting study's command on a 2-core CPU."""
    y = np.asarray(labels[:LABEL_WORD_TEXTS])
    if task != "classification" or len(np.unique(y)) < 2:
        return []
    docs = [set(WORD.findall(t.lower())) for t in texts[:LABEL_WORD_TEXTS]]
    vocabulary = sorted(set().union(*docs))
    if not vocabulary:
        return []
    index = {w: i for i, w in enumerate(vocabulary)}
    words = np.fromiter((index[w] for d in docs for w in d), dtype=np.int64)
    of_class = np.repeat(y, [len(d) for d in docs])
    width = len(vocabulary)
    counts = np.bincount(of_class * width + words, minlength=(int(y.max()) + 1) * width).reshape(-1, width)
    total, found = counts.sum(0), []
    for c in np.unique(y):
        inside = y == c
        n_in, n_out = int(inside.sum()), int((~inside).sum())
        if n_in < LABEL_WORD_MIN_TEXTS:
            continue
        share = counts[c] / n_in
        elsewhere = (total - counts[c]) / n_out
        hits = np.flatnonzero((share >= LABEL_WORD_SHARE) & (elsewhere <= LABEL_WORD_ELSEWHERE))
        for i in hits[np.argsort(-share[hits], kind="stable")][:3]:
            found.append(
                {"word": vocabulary[i], "label": names[c], "share": share[i], "elsewhere": elsewhere[i]}
            )
    return found


def label_word_note(words: list[dict] | None) -> str | None:
    """A warning naming the words that tell the classes apart by themselves (`label_words`)."""
    if not words:
        return None
    said = "; ".join(
        f"'{w['word']}' is in {w['share']:.0%} of class {w['label']}'s training texts and "
        f"{w['elsewhere']:.1%} of the others'"
        for w in words
    )
    return (
        f"single words tell the classes apart: {said}. If the label is written into the texts (a template, "
        "a rating, a source tag), scores measure reading it, not the task; take it out of the texts"
    )


def label_name_note(names: list[str]) -> str | None:
    """A warning where class names differ only in case or spacing ('Pos' and 'pos'): as written they are
    different classes, which is rarely what was meant."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_dedup_key(str(name)), []).append(str(name))
    alike = [g for g in groups.values() if len(g) > 1]
    if not alike:
        return None
    said = "; ".join(" and ".join(f"'{n}'" for n in g) for g in alike)
    return (
        f"class names that differ only in case or spacing are different classes as written: {said}; if "
        "each group is one class, write its labels alike in the data"
    )


def _dedup_key(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclass
class Tokenized:
    """Token ids per split, unpadded (flat array + offsets), plus labels: what a run needs of the data."""

    ids: dict[str, list[np.ndarray]]
    labels: dict[str, np.ndarray]
    label_names: list[str]
    truncated: dict[str, int]

    def lengths(self, split: str) -> np.ndarray:
        return np.array([len(x) for x in self.ids[split]], dtype=np.int64)

    def save(self, path: Path) -> None:
        arrays = {}
        for s, seqs in self.ids.items():
            arrays[f"{s}_flat"] = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32)
            arrays[f"{s}_offsets"] = np.cumsum([0] + [len(x) for x in seqs]).astype(np.int64)
            arrays[f"{s}_labels"] = self.labels[s]
            arrays[f"{s}_truncated"] = np.array(self.truncated[s])
        arrays["label_names"] = np.array(self.label_names, dtype=str)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Tokenized:
        z = np.load(path, allow_pickle=False)
        ids, labels, trunc = {}, {}, {}
        for s in SPLITS:
            flat, off = z[f"{s}_flat"], z[f"{s}_offsets"]
            ids[s] = [flat[off[i] : off[i + 1]] for i in range(len(off) - 1)]
            labels[s] = z[f"{s}_labels"]
            trunc[s] = int(z[f"{s}_truncated"])
        return cls(ids, labels, [str(x) for x in z["label_names"]], trunc)


def tokenize(data: StudyData, tokenizer, max_length: int, pair: bool = False) -> Tokenized:
    """Tokenize every split once (no padding: batches are padded to their own longest item), on the fast
    tokenizer's threads unless TOKENIZERS_PARALLELISM says otherwise: IMDb's 50,000 texts took 14.8-16.5 s
    instead of 27.3-32.3 s on a 2-core CPU (2026-12-06). Afterwards TOKENIZERS_PARALLELISM is
    "false": the runs' processes are forked from a forkserver that never tokenized, and a process forked
    from this one later tokenizes on one thread without the tokenizers library's warning."""
    ids, trunc = {}, {}
    threads = "TOKENIZERS_PARALLELISM" not in os.environ
    if threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        for s in SPLITS:
            enc = encode(tokenizer, data.texts[s], max_length, pair)
            ids[s] = [np.asarray(x, dtype=np.int32) for x in enc]
            trunc[s] = int(sum(len(x) >= max_length for x in enc))
    finally:
        if threads:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return Tokenized(ids, {s: data.labels[s] for s in SPLITS}, list(data.label_names), trunc)


# Share of the training split's tokens that may be the unknown token before the tokenizer is called wrong;
# above NOTE_UNKNOWN a study is warned (English text through BERT's vocabulary: well under 1%).
MAX_UNKNOWN = 0.5
NOTE_UNKNOWN = 0.05


def check_unknown_tokens(tok: Tokenized, tokenizer, model: str) -> str | None:
    """A tokenizer that maps most words to its unknown token (a model folder without its tokenizer files gets
    one built from the special tokens alone) makes every score meaningless: a one-line error. One that maps
    a notable share (over NOTE_UNKNOWN) hides those words from the model: returns a warning."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not tok.ids["train"]:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
    flat = np.concatenate(tok.ids["train"])
    words = flat[~np.isin(flat, list(special))] if special else flat
    share = float(np.mean(words == unk)) if len(words) else 0.0
    said = f"model '{model}': its tokenizer maps {share:.0%} of the training text to the unknown token "
    if share > MAX_UNKNOWN:
        raise UserError(
            f"{said}({tokenizer.unk_token}); the model folder's tokenizer files are missing or do not fit "
            "the data"
        )
    if share > NOTE_UNKNOWN:
        return (
            f"{said}({tokenizer.unk_token}): the model never sees those words; a model whose vocabulary "
            "covers the data's language and script would"
        )
    return None
