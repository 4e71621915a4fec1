"""Data loading (parquet, csv, jsonl, string labels), seeded stratified splits, and their disjointness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fresh_python, make_rows, run_study, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftbench import config
from peftbench import data as data_mod
from peftbench import report
from peftbench.errors import UserError


def spec(path, **kw) -> dict:
    return config.validate({"model": "m", "data": {"path": str(path), **kw}, "methods": ["full"]})["data"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_formats_load_the_same_rows(tmp_path, fmt):
    d = data_mod.load(spec(write_dataset(tmp_path / fmt, fmt), train_size=100, test_size=40))
    assert d.sizes() == {"train": 100, "validation": 10, "test": 40}
    assert d.label_names == ["0", "1"]
    ref = make_rows(160, 1)
    assert d.texts["train"][0] == ref["text"][d.rows["train"][0]]


def test_string_labels_are_mapped_and_stored(tmp_path):
    folder = write_dataset(tmp_path / "s", "csv", classes=3, string_labels=True)
    d = data_mod.load(spec(folder))
    assert d.label_names == ["mixed", "neg", "pos"]
    assert set(np.unique(d.labels["train"])) == {0, 1, 2}


def test_text_columns_are_joined_or_paired(tmp_path):
    folder = tmp_path / "multi"
    folder.mkdir()
    for split in ("train", "test"):
        pd.DataFrame(
            {
                "title": ["a", "b"] * 10,
                "body": ["good film", "bad film"] * 10,
                "tag": ["x", "y"] * 10,
                "y": [1, 0] * 10,
            }
        ).to_parquet(folder / f"{split}.parquet")
    # three texts, repeated (all overlap): joined with the separator
    opts = dict(label_column="y", separator=" | ", validation_size=4, allow_overlap=True)
    d = data_mod.load(spec(folder, text_column=["title", "body", "tag"], **opts))
    assert all(t in ("a | good film | x", "b | bad film | y") for t in d.texts["train"])
    # two texts: a sentence pair, kept apart for the tokenizer
    d = data_mod.load(spec(folder, text_column=["title", "body"], **opts))
    assert all(t in (f"a{data_mod.PAIR}good film", f"b{data_mod.PAIR}bad film") for t in d.texts["train"])


def test_splits_are_disjoint_and_stratified(tmp_path):
    d = data_mod.load(
        spec(
            write_dataset(tmp_path / "d", n_train=400, n_test=200),
            train_size=200,
            validation_size=50,
            test_size=100,
        )
    )
    tr, va = set(d.rows["train"]), set(d.rows["validation"])
    assert not tr & va
    assert len(tr) == 200 and len(va) == 50 and len(set(d.rows["test"])) == 100
    assert abs(d.labels["train"].mean() - 0.5) <= 0.01 and abs(d.labels["test"].mean() - 0.5) <= 0.01


def test_validation_carved_from_train_when_the_pool_is_small(tmp_path):
    d = data_mod.load(spec(write_dataset(tmp_path / "d", n_train=100), validation_size=0.2))
    assert d.sizes()["train"] == 80 and d.sizes()["validation"] == 20
    assert not set(d.rows["train"]) & set(d.rows["validation"])
    assert "carved" in d.source["origin"]


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    folder = write_dataset(tmp_path / "d", n_train=300)
    a = data_mod.load(spec(folder, train_size=100, seed=1))
    b = data_mod.load(spec(folder, train_size=100, seed=1))
    c = data_mod.load(spec(folder, train_size=100, seed=2))
    assert a.fingerprint == b.fingerprint and list(a.rows["train"]) == list(b.rows["train"])
    assert a.fingerprint != c.fingerprint


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_train=st.integers(20, 300),
    frac=st.floats(0.05, 0.5),
    seed=st.integers(0, 10_000),
    classes=st.integers(2, 4),
    want=st.one_of(st.none(), st.integers(5, 400)),
)
def test_split_disjointness_property(n_train, frac, seed, classes, want):
    labels = np.arange(n_train) % classes
    rng = np.random.default_rng(seed)
    n = min(want or n_train, n_train)
    picked = data_mod.stratified_sample(labels, n, rng)
    assert len(picked) == len(set(picked)) == n
    counts = np.bincount(labels[picked], minlength=classes)
    expected = np.bincount(labels, minlength=classes) / n_train * n
    assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda df: df.rename(columns={"text": "review"}),
            "data.text_column: column 'text' not in the train file",
        ),
        (lambda df: df.drop(columns=["label"]), "data.label_column: column 'label' not in the train file"),
        (lambda df: df.assign(label=1), "only one class"),
        (lambda df: df.assign(label=[-1] + list(df.label[1:])), "is negative"),
        (lambda df: df.assign(label=[0.5] + list(df.label[1:])), "looks like regression"),
        (lambda df: df.assign(label=["x"] + list(df.label[1:])), "mix integers and strings"),
        (lambda df: df.assign(text=[""] + list(df.text[1:])), "empty text"),
        (lambda df: df.assign(text=[None] + list(df.text[1:])), "missing or non-text"),
    ],
)
def test_bad_train_data_gets_one_line(tmp_path, mutate, message):
    folder = write_dataset(tmp_path / "d", "jsonl")
    df = pd.read_json(folder / "train.jsonl", lines=True)
    mutate(df).to_json(folder / "train.jsonl", orient="records", lines=True)
    with pytest.raises(UserError) as e:
        data_mod.load(spec(folder))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_empty_corrupt_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data_mod.load(spec(tmp_path / "nothing"))
    folder = write_dataset(tmp_path / "d")
    (folder / "test.parquet").unlink()
    with pytest.raises(UserError, match="no test file"):
        data_mod.load(spec(folder))
    (folder / "test.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        data_mod.load(spec(folder))
    (folder / "test.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="cannot be read as parquet"):
        data_mod.load(spec(folder))
    bad = tmp_path / "latin"
    bad.mkdir()
    (bad / "train.csv").write_bytes("text,label\ncaf\xe9 good,1\nbad,0\n".encode("latin-1"))
    (bad / "test.csv").write_bytes(b"text,label\ngood,1\nbad,0\n")
    with pytest.raises(UserError, match="not UTF-8"):
        data_mod.load(spec(bad))


def test_two_train_files_are_ambiguous(tmp_path):
    folder = write_dataset(tmp_path / "d")
    write_dataset(folder, "csv")
    with pytest.raises(UserError, match="more than one train file"):
        data_mod.load(spec(folder))


def test_test_labels_unseen_in_train(tmp_path):
    folder = write_dataset(tmp_path / "d")
    df = pd.read_parquet(folder / "test.parquet")
    df.assign(label=[7] + list(df.label[1:])).to_parquet(folder / "test.parquet")
    with pytest.raises(UserError, match="never occur in train"):
        data_mod.load(spec(folder))


def test_sizes_larger_than_the_data(tmp_path):
    folder = write_dataset(tmp_path / "d")
    with pytest.raises(UserError, match="train_size 999 is larger"):
        data_mod.load(spec(folder, train_size=999))
    with pytest.raises(UserError, match="test_size 999 is larger"):
        data_mod.load(spec(folder, test_size=999))


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_loader_fuzz_never_tracebacks(tmp_path_factory, blob):
    folder = tmp_path_factory.mktemp("fuzz")
    write_dataset(folder, "csv")
    (folder / "train.csv").write_bytes(blob)
    try:
        data_mod.load(spec(folder))
    except UserError as e:
        assert str(e).strip()


def test_tokenize_once_roundtrip(tmp_path, tiny_encoder):
    from transformers import AutoTokenizer

    d = data_mod.load(spec(write_dataset(tmp_path / "d")))
    tok = data_mod.tokenize(d, AutoTokenizer.from_pretrained(tiny_encoder), 16)
    tok.save(tmp_path / "t.npz")
    back = data_mod.Tokenized.load(tmp_path / "t.npz")
    assert back.label_names == tok.label_names
    for s in data_mod.SPLITS:
        assert len(back.ids[s]) == len(tok.ids[s])
        assert all((a == b).all() for a, b in zip(back.ids[s], tok.ids[s]))
        assert max(len(x) for x in back.ids[s]) <= 16


def test_tokenizing_on_the_tokenizers_threads_gives_the_same_ids_and_then_turns_them_off(
    tmp_path, tiny_encoder, monkeypatch
):
    """Unset, TOKENIZERS_PARALLELISM is "true" while the study tokenizes and "false" after it (a process
    forked later tokenizes on one thread, without the tokenizers library's warning); a value the user set
    is theirs."""
    from transformers import AutoTokenizer

    d = data_mod.load(spec(write_dataset(tmp_path / "d")))
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    seen = []
    encode = data_mod.encode
    monkeypatch.setattr(
        data_mod,
        "encode",
        lambda *a: seen.append(data_mod.os.environ["TOKENIZERS_PARALLELISM"]) or encode(*a),
    )
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    threaded = data_mod.tokenize(d, tokenizer, 16)
    assert seen == ["true"] * 3 and data_mod.os.environ["TOKENIZERS_PARALLELISM"] == "false"
    for value in ("false", "true"):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
        again = data_mod.tokenize(d, tokenizer, 16)
        assert seen[-3:] == [value] * 3 and data_mod.os.environ["TOKENIZERS_PARALLELISM"] == value
        for s in data_mod.SPLITS:
            assert all((a == b).all() for a, b in zip(again.ids[s], threaded.ids[s]))


def test_the_shipped_imdb_sample_is_the_fallback_and_balanced(tmp_path, monkeypatch):
    monkeypatch.delenv(config.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/imdb beside it, as on a fresh clone
    path = config.default_data_path()
    assert path == config.sample_data_path()
    d = data_mod.load(spec(path, train_size=600, validation_size=200, test_size=500))
    assert d.sizes() == {"train": 600, "validation": 200, "test": 500}
    assert all(abs(d.labels[s].mean() - 0.5) < 0.01 for s in ("train", "validation", "test"))
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path))
    assert config.default_data_path() == str(tmp_path)


def test_test_texts_that_are_training_texts_are_counted_and_refused_over_five_percent(tmp_path):
    folder = write_dataset(tmp_path / "d", n_train=200, n_test=100)
    train = pd.read_parquet(folder / "train.parquet")
    test = pd.read_parquet(folder / "test.parquet")
    d = data_mod.load(spec(folder))
    base = d.source["overlap"]["test_texts_also_in_train"]
    test.loc[:4, "text"] = train["text"][:5].values  # 10 of 100 test texts copied from train: 5 as they are,
    test.loc[5:9, "text"] = [f"  {t.upper()}\n" for t in train["text"][5:10]]  # 5 re-cased and re-spaced
    test.to_parquet(folder / "test.parquet")
    with pytest.raises(UserError, match=r"test texts \(1[0-9]%\) are also training texts"):
        data_mod.load(spec(folder))
    d = data_mod.load(spec(folder, allow_overlap=True))
    assert d.source["overlap"]["test_texts_also_in_train"] >= base + 10
    with pytest.raises(UserError, match="train_split and test_split are both 'train'"):
        data_mod.load(spec(folder, test_split="train"))


def test_validation_texts_repeated_in_training_are_counted_and_warned_of(tmp_path):
    """Validation is carved out of the training data, so a training file that repeats texts puts copies on
    both sides, where they inflate the validation scores that choose learning rates and epochs."""
    folder = write_dataset(tmp_path / "d", n_train=200, n_test=100)
    d = data_mod.load(spec(folder))
    assert d.source["overlap"]["validation_texts_also_in_train"] == 0
    assert data_mod.repeated_text_notes(d.source["overlap"], d.sizes()) == []
    train = pd.read_parquet(folder / "train.parquet")
    pd.concat([train, train]).to_parquet(folder / "train.parquet")  # every text twice
    d = data_mod.load(spec(folder))
    n_val = len(d.texts["validation"])
    n = d.source["overlap"]["validation_texts_also_in_train"]
    assert n > 0.5 * n_val  # a copy of most validation texts stays in training
    (note,) = data_mod.repeated_text_notes(d.source["overlap"], d.sizes())  # the labels agree: one note
    assert f"{n} of the {n_val} validation texts" in note


def test_texts_given_two_labels_are_counted_and_warned_of(tmp_path, monkeypatch):
    """A training file joined from two sources that code the labels otherwise repeats texts with the other
    label: no model can answer both copies, and the scores are capped where nothing says why."""
    folder = write_dataset(tmp_path / "d", n_train=200, n_test=100)
    d = data_mod.load(spec(folder))
    assert d.source["overlap"]["texts_labelled_twice"] == 0
    train = pd.read_parquet(folder / "train.parquet")
    flipped = train[:20].assign(label=1 - train["label"][:20], text=train["text"][:20].str.upper())
    pd.concat([train, flipped]).to_parquet(folder / "train.parquet")
    d = data_mod.load(spec(folder))
    twice = d.source["overlap"]["texts_labelled_twice"]
    assert twice == 20  # counted once per text
    notes = data_mod.repeated_text_notes(d.source["overlap"], d.sizes())
    assert any(f"{twice} texts appear with two or more different labels" in n for n in notes)
    small = data_mod.load(spec(folder, train_size=40, validation_size=10, test_size=20))
    assert small.source["overlap"]["texts_labelled_twice"] == twice == 20  # over the files, not the sample
    assert small.source["overlap"]["texts_checked_for_labels"] == 200 + 20 + 100
    monkeypatch.setattr(data_mod, "MAX_KEYED_TEXTS", 300)  # larger files: the sampled splits alone
    sampled = data_mod.load(spec(folder, train_size=40, validation_size=10, test_size=20)).source["overlap"]
    assert sampled["texts_checked_for_labels"] == 70 and sampled["texts_labelled_twice"] < twice
    train[:20].assign(text=train["text"][:20] + " again").pipe(lambda x: pd.concat([train, x])).to_parquet(
        folder / "train.parquet"
    )  # new texts: nothing labelled twice
    assert data_mod.load(spec(folder)).source["overlap"]["texts_labelled_twice"] == 0


def test_a_label_written_into_the_texts_is_warned_of(tmp_path, capsys):
    """Texts that carry their own label (a template's "Label: positive", a rating, a source tag) let any
    classifier read the answer off: a study warns, and a study of the same texts without it does not."""
    folder = write_dataset(tmp_path / "d", n_train=200, n_test=100)
    assert data_mod.load(spec(folder)).source["label_words"] == []
    for split in ("train", "test"):
        df = pd.read_parquet(folder / f"{split}.parquet")
        df["text"] = np.where(df["label"] == 1, "Verdict: thumbs ", "Verdict: down ") + df["text"]
        df.loc[df.index[:3], "text"] = "thumbs " + df["text"][:3]  # a few of the others have it too
        df.to_parquet(folder / f"{split}.parquet")
    d = data_mod.load(spec(folder))
    words = {w["word"]: w for w in d.source["label_words"]}
    assert set(words) == {"thumbs", "down"} and words["thumbs"]["share"] == 1.0
    assert 0 < words["thumbs"]["elsewhere"] <= data_mod.LABEL_WORD_ELSEWHERE
    assert "verdict" not in words  # in every text: tells nothing
    note = data_mod.label_word_note(d.source["label_words"])
    assert note.startswith("single words tell the classes apart: 'down' is in 100% of class ")
    assert data_mod.label_word_note([]) is None
    raw = {"model": "unused", "data": {"path": str(folder)}, "methods": ["tfidf"], "isolation": "inline"}
    run_study(raw, tmp_path / "s")  # at the start, and in the report
    assert f"peftbench: warning: {note}" in capsys.readouterr().err
    assert f"**Note: {note}.**" in report.write_report(tmp_path / "s")["markdown"].read_text()


def test_label_words_are_the_words_scikit_learns_count_vectorizer_finds():
    """`label_words` splits texts as CountVectorizer does by default, without importing scikit-learn: the
    same words, classes, shares and order on real reviews with words that give the label away, accented and
    non-Latin words, digits, underscores, apostrophes and one-letter words among them."""
    from sklearn.feature_extraction.text import CountVectorizer

    df = pd.read_parquet(Path(data_mod.__file__).parent / "sample_data" / "imdb" / "train.parquet")[:300]
    tags = {0: "Naïve_VERDICT: 1/10 Ω-pan l'avis ", 1: "ÉLOGE straße 10/10 x "}
    texts = [tags[y] * (i % 7 > 0) + t for i, (t, y) in enumerate(zip(df["text"], df["label"]))]
    labels = df["label"].to_numpy()

    vectorizer = CountVectorizer(binary=True, dtype=np.int32)
    counts = vectorizer.fit_transform(texts).tocsc()
    vocabulary, expected = vectorizer.get_feature_names_out(), []
    for c in (0, 1):
        inside = labels == c
        share = np.asarray(counts[inside].sum(0)).ravel() / inside.sum()
        elsewhere = np.asarray(counts[~inside].sum(0)).ravel() / (~inside).sum()
        hits = np.flatnonzero(
            (share >= data_mod.LABEL_WORD_SHARE) & (elsewhere <= data_mod.LABEL_WORD_ELSEWHERE)
        )
        expected += [
            (str(vocabulary[i]), c, share[i], elsewhere[i])
            for i in hits[np.argsort(-share[hits], kind="stable")][:3]
        ]
    found = data_mod.label_words(texts, labels, "classification", [0, 1])
    # 'avis', 'naïve_verdict', 'pan'; 'straße', 'éloge': not 'l', 'x' or 'Ω' (one letter), nor '10' (both)
    assert len(expected) == 5
    assert [(w["word"], w["label"], w["share"], w["elsewhere"]) for w in found] == expected


def test_loading_data_leaves_scikit_learn_unimported(tmp_path):
    """A study's main process loads and checks its data before its runs start; scikit-learn, which only the
    runs need, would add its import to that wait (`data.label_words`)."""
    folder = write_dataset(tmp_path / "d", n_train=200, n_test=100)
    code = (
        "from peftbench import data\n"
        f"d = data.load({{'path': {str(folder)!r}, 'text_column': 'text', 'label_column': 'label', "
        "'train_size': None, 'validation_size': 0.1, 'test_size': None, 'seed': 0, 'separator': ' ', "
        "'train_split': 'train', 'test_split': 'test', 'name': None, 'config': None}, 'classification')\n"
        "print(len(d.texts['train']), 'sklearn' in sys.modules)"
    )
    assert fresh_python(code).split() == ["180", "False"]


def test_class_names_alike_but_for_case_or_spacing_are_warned_of():
    note = data_mod.label_name_note(["Pos", "neg", "pos", "NEG", "very  good", "Very good", "other"])
    assert note == (
        "class names that differ only in case or spacing are different classes as written: 'Pos' and "
        "'pos'; 'neg' and 'NEG'; 'very  good' and 'Very good'; if each group is one class, write its labels "
        "alike in the data"
    )
    assert data_mod.label_name_note(["01", "1", "2"]) is None  # distinct as written, and alike in no way


def test_a_label_column_of_ids_is_refused(tmp_path):
    folder = write_dataset(tmp_path / "d", n_train=200, n_test=100)
    for split in ("train", "test"):
        df = pd.read_parquet(folder / f"{split}.parquet")
        df.assign(label=[f"row-{i}" for i in range(len(df))]).to_parquet(folder / f"{split}.parquet")
    with pytest.raises(
        UserError, match="'label' has 200 distinct values in 200 training rows: that is an id"
    ):
        data_mod.load(spec(folder))


def test_labels_that_differ_as_written_stay_distinct(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for split in ("train", "test"):
        rows = [{"text": f"text {split} {i}", "label": ["01", "1", "2"][i % 3]} for i in range(60)]
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    d = data_mod.load(spec(folder))
    assert d.label_names == ["01", "1", "2"]


def test_the_fingerprint_covers_the_texts(tmp_path):
    folder = write_dataset(tmp_path / "d")
    a = data_mod.load(spec(folder)).fingerprint
    df = pd.read_parquet(folder / "train.parquet")
    df["text"] = "the same text"  # every text replaced: the runs must not be reused
    df.to_parquet(folder / "train.parquet")
    assert data_mod.load(spec(folder)).fingerprint != a


AG_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


def _ag_news_rows(n: int) -> list[dict]:
    """AG News-like rows: 4 classes, a title and a description, the class decided by a cue word."""
    cues = {"World": "election", "Sports": "match", "Business": "market", "Sci/Tech": "software"}
    return [
        {
            "label": AG_CLASSES[i % 4],
            "title": f"headline {i} {cues[AG_CLASSES[i % 4]]}",
            "description": f"story number {i} about the {cues[AG_CLASSES[i % 4]]} today",
        }
        for i in range(n)
    ]


def test_a_headerless_single_file_with_class_names(tmp_path):
    path = tmp_path / "ag_news.csv"
    pd.DataFrame(_ag_news_rows(200)).to_csv(path, index=False, header=False)
    with pytest.raises(UserError, match=r"seems to have no header row .*data.columns"):
        data_mod.load(spec(path, text_column=["title", "description"]))
    d = data_mod.load(
        spec(
            path,
            columns=["label", "title", "description"],
            text_column=["title", "description"],
            test_size=0.25,
        )
    )
    assert d.label_names == sorted(AG_CLASSES) and d.sizes()["test"] == 50
    assert set(d.rows["test"]).isdisjoint(d.rows["train"]) and set(d.rows["validation"]).isdisjoint(
        d.rows["train"]
    )
    assert all(np.bincount(d.labels["test"], minlength=4) == 12 + (np.arange(4) < 2))  # stratified: 50 over 4


def test_a_single_file_with_a_header_and_integer_labels_named(tmp_path):
    rows = [{**r, "label": AG_CLASSES.index(r["label"]) + 1} for r in _ag_news_rows(160)]
    path = tmp_path / "ag.tsv"
    pd.DataFrame(rows).to_csv(path, index=False, sep="\t")
    d = data_mod.load(spec(path, text_column="description", label_names=AG_CLASSES))
    assert d.label_names == AG_CLASSES and d.sizes()["test"] == 32  # a fifth by default
    text = d.texts["test"][0]
    row = d.rows["test"][0]
    assert (
        text == rows[row]["description"]
        and d.label_names[d.labels["test"][0]] == AG_CLASSES[rows[row]["label"] - 1]
    )
    with pytest.raises(UserError, match="data.label_names: 2 names for 4 classes"):
        data_mod.load(spec(path, text_column="description", label_names=["a", "b"]))


def test_a_study_from_command_line_flags_alone(tmp_path, tiny_encoder, capsys, monkeypatch):
    import json

    from peftbench import cli

    path = tmp_path / "ag_news.csv"
    pd.DataFrame(_ag_news_rows(120)).to_csv(path, index=False, header=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                "run",
                "--model",
                str(tiny_encoder),
                "--data",
                str(path),
                "--columns",
                "label,title,description",
                "--text-column",
                "title,description",
                "--methods",
                "tfidf",
                "--test-size",
                "0.25",
                "--out",
                str(tmp_path / "out"),
                "--no-report",
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err[-800:]
    plan = json.loads((tmp_path / "out" / "study.json").read_text())
    assert plan["data"]["label_names"] == sorted(AG_CLASSES) and plan["data"]["sizes"]["test"] == 30


def test_a_sentence_pair_is_encoded_as_the_tokenizer_encodes_pairs(tmp_path, tiny_encoder):
    """text_column: [a, b] gives the tokenizer's own pair ids (its separator, the longer side truncated
    first), and the model sees the tokenizer's token_type_ids (BERT's segments) without carrying them."""
    import torch
    from conftest import study
    from transformers import AutoTokenizer

    from peftbench import config, models
    from peftbench.data import PAIR, Tokenized
    from peftbench.runner import Study

    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, n, seed in (("train", 120, 1), ("test", 60, 2)):
        df = make_rows(n, seed)
        df["b"] = [" ".join(t.split()[::-1] * 3) for t in df["text"]]  # long second texts: truncation bites
        df.to_parquet(folder / f"{split}.parquet")
    raw = study(tiny_encoder, folder, ["lora"], data={"text_column": ["text", "b"], "train_size": 100})
    st = Study(config.validate(raw), tmp_path / "s")
    st.out.mkdir()
    st.prepare()
    tok = Tokenized.load(st.tok_file)
    ref = AutoTokenizer.from_pretrained(tiny_encoder)
    max_len = raw["train"]["max_length"]
    for s in ("train", "validation", "test"):
        a, b = zip(*(t.split(PAIR) for t in st.data.texts[s]))
        want = ref(list(a), list(b), truncation=True, max_length=max_len)["input_ids"]
        assert [list(x) for x in tok.ids[s]] == want
    assert tok.truncated["train"] > 0

    spec = st.final_specs({})[0]
    model, _ = models.build_model(spec, ["0", "1"], "cpu", 10)
    seen = {}
    model.get_base_model().bert.register_forward_pre_hook(
        lambda mod, args, kw: seen.update(tt=kw["token_type_ids"]), with_kwargs=True
    )
    enc = ref(
        list(a[:4]), list(b[:4]), truncation=True, max_length=max_len, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert torch.equal(seen["tt"][real], enc["token_type_ids"][real])
    assert seen["tt"].sum() > 0


def test_a_run_on_sentence_pairs_predicts_pairs(tmp_path, tiny_encoder):
    """predict on a run trained on pairs takes FIRST<TAB>SECOND and scores it as the run's own test pairs
    were scored; a text without the tab is a one-line error."""
    from conftest import run_study, study

    from peftbench.errors import UserError
    from peftbench.predict import predict_texts

    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, n, seed in (("train", 120, 1), ("test", 60, 2)):
        df = make_rows(n, seed)
        df["b"] = ["and so on"] * n
        df.to_parquet(folder / f"{split}.parquet")
    raw = study(tiny_encoder, folder, ["lora"], data={"text_column": ["text", "b"]}, train={"epochs": 1})
    (res,) = run_study(raw, tmp_path / "s")
    assert res["status"] == "success" and res["reload_check"]["identical_predictions"]
    run_dir = tmp_path / "s" / "runs" / res["run_id"]
    test = pd.read_parquet(folder / "test.parquet")
    preds = pd.read_parquet(run_dir / "predictions.parquet").head(5)
    out = predict_texts(run_dir, [f"{test['text'][int(r)]}\tand so on" for r in preds["row"]])
    assert [o["label"] for o in out] == [str(p) for p in preds["prediction"]]
    assert [o["probabilities"][o["label"]] for o in out] == pytest.approx(
        [max(a, b) for a, b in zip(preds["p_0"], preds["p_1"])], abs=1e-3
    )
    with pytest.raises(UserError, match="FIRST<TAB>SECOND"):
        predict_texts(run_dir, ["no tab here"])


def test_a_tokenizer_that_misses_a_notable_share_of_the_words_is_warned_of(tiny_encoder, tmp_path):
    """Over 5% of the training tokens unknown: a warning naming the share (over 50%: an error, in the
    bad-input catalogue); the data as the tokenizer knows it: no warning."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    folder = write_dataset(tmp_path / "d")
    d = data_mod.load(spec(folder))
    assert data_mod.check_unknown_tokens(data_mod.tokenize(d, tokenizer, 64), tokenizer, "tiny") is None
    d.texts = {s: [t + " zqx vlorp" for t in texts] for s, texts in d.texts.items()}  # words it lacks
    said = data_mod.check_unknown_tokens(data_mod.tokenize(d, tokenizer, 64), tokenizer, "tiny")
    assert said and said.startswith("model 'tiny': its tokenizer maps 1") and "[UNK]" in said, said
