"""The text family's readers: plain text and WikiText names, JSONL classification, the fortunes corpus and its
split, and every kind of bad input as one DatasetError line naming the file (and offset or line)."""

import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

from varprune.data import text
from varprune.data.base import DatasetError
from varprune.device import available_memory

FORTUNES = Path(text.DEBIAN_FORTUNES)
needs_fortunes = pytest.mark.skipif(
    not (FORTUNES / "fortunes").is_file(), reason="apt-get install fortunes (scripts/setup.sh)"
)


def write(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode()
        (folder / name).write_bytes(data)
    return folder


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ----------------------------------------------------------------- plain text and WikiText


def test_text_reads_every_split_whole(tmp_path):
    train, valid, test = "one two three\n\nfour\n", "valid text\n", " = Title = \n test text\n"
    write(tmp_path, {"train.txt": train, "valid.txt": valid, "test.txt": test})
    corpus = text.load("text", tmp_path)
    assert corpus.info.task == "language-modeling" and corpus.info.channels == 0 and corpus.info.size == 0
    assert {k: s.text for k, s in corpus.splits.items()} == {"train": train, "valid": valid, "test": test}
    assert corpus.splits["test"].num_bytes == len(test.encode())
    assert corpus.splits["train"].file == str(tmp_path / "train.txt")
    assert corpus.source == str(tmp_path)


def test_valid_is_optional_and_need_test_reads_no_test_file(tmp_path):
    write(tmp_path, {"train.txt": "train\n"})
    assert set(text.load("text", tmp_path, need_test=False).splits) == {"train"}
    message = one_line_error(text.load, "text", tmp_path)
    assert "missing test.txt" in message and str(tmp_path) in message
    write(tmp_path, {"test.txt": "test\n"})
    assert set(text.load("text", tmp_path).splits) == {"train", "test"}


@pytest.mark.parametrize("sub", ["", "wikitext-2-raw", "wikitext-103-raw"])
def test_wikitext_raw_names_as_they_come(tmp_path, sub):
    files = {f"wiki.{s}.raw": f" = {s} = \n \n Senjō no Valkyria 3 @-@ <unk> \n" for s in ("train", "valid", "test")}
    write(tmp_path / sub, files)
    corpus = text.load("text", tmp_path)
    assert {k: s.text for k, s in corpus.splits.items()} == {k: files[f"wiki.{k}.raw"] for k in text.SPLITS}
    where = text.locate("text", tmp_path)
    assert where.complete and sorted(p.name for p in where.found) == sorted(files)


def test_two_training_texts_are_ambiguous(tmp_path):
    write(tmp_path, {"train.txt": "a\n", "test.txt": "b\n", "wiki.train.raw": "c\n", "wiki.test.raw": "d\n"})
    message = one_line_error(text.load, "text", tmp_path)
    assert "train.txt" in message and "wiki.train.raw" in message and "more than one" in message
    assert not text.locate("text", tmp_path).complete


def test_locate_lists_files_without_reading_them(tmp_path):
    where = text.locate("text", tmp_path)
    assert not where.complete and "train.txt" in where.missing and str(tmp_path) in where.not_found_message()
    write(tmp_path, {"train.txt": b"\xff not even read", "test.txt": ""})  # bad content: locate does not care
    assert text.locate("text", tmp_path).complete
    os.mkfifo(tmp_path / "valid.txt")
    where = text.locate("text", tmp_path)
    assert any("FIFO" in m for m in where.missing)


def test_download_is_one_clear_line(tmp_path):
    message = one_line_error(text.load, "text", tmp_path, download=True)
    assert "not supported" in message and "WikiText" in message and "wiki.train.raw" in message


def test_missing_files_name_the_folder(tmp_path):
    for name in text.DATASETS:
        assert str(tmp_path) in one_line_error(text.load, name, tmp_path)


# ----------------------------------------------------------------- JSONL classification


def test_jsonl_string_labels(tmp_path):
    train = [{"text": "buy now", "label": "spam"}, {"text": "hi mom", "label": "ham"}, {"text": "x", "label": "eggs"}]
    test = [{"text": "cheap", "label": "spam"}, {"text": "dinner?", "label": "ham"}]
    write(tmp_path, {"train.jsonl": jsonl(train), "test.jsonl": "\n" + jsonl(test) + "\n\n"})  # blank lines skipped
    corpus = text.load("text-classification", tmp_path)
    assert corpus.info.task == "text-classification"
    assert corpus.class_names == ("eggs", "ham", "spam") and corpus.info.num_classes == 3
    assert corpus.splits["train"].texts == ["buy now", "hi mom", "x"]
    assert corpus.splits["train"].labels == [2, 1, 0] and corpus.splits["test"].labels == [2, 1]


def test_jsonl_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": str(i), "label": lab} for i, lab in enumerate([10, 2, -1, 2, 10])]
    write(tmp_path, {"train.jsonl": jsonl(rows), "test.jsonl": jsonl(rows[:2]), "valid.jsonl": jsonl(rows[2:3])})
    corpus = text.load("text-classification", tmp_path)
    assert corpus.class_names == ("-1", "2", "10")  # not the string order -1, 10, 2
    assert corpus.splits["train"].labels == [2, 1, 0, 1, 2] and corpus.splits["valid"].labels == [0]


def test_label_in_test_absent_from_train(tmp_path):
    write(
        tmp_path,
        {
            "train.jsonl": jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]),
            "test.jsonl": jsonl([{"text": "a", "label": "x"}, {"text": "c", "label": "z"}]),
        },
    )
    message = one_line_error(text.load, "text-classification", tmp_path)
    assert f"{tmp_path / 'test.jsonl'} line 2" in message and "'z'" in message and "train.jsonl" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "a", "label": "x"', "is not JSON"),
        ("[1, 2]", "not an object"),
        ('{"label": "x"}', "lacks the field 'text'"),
        ('{"text": "a"}', "lacks the field 'label'"),
        ('{"text": 3, "label": "x"}', "'text' is a JSON number, not a string"),
        ('{"text": "a", "label": 1.5}', "'label' is a JSON number"),
        ('{"text": "a", "label": true}', "'label' is a JSON boolean"),
        ('{"text": "a", "label": null}', "'label' is a JSON null"),
        ('{"text": "a", "label": 3}', "mixes strings and integers"),
    ],
)
def test_bad_jsonl_line_names_its_number(tmp_path, line, expected):
    good = '{"text": "fine", "label": "x"}\n'
    write(tmp_path, {"train.jsonl": good + "\n" + line + "\n" + good, "test.jsonl": good})
    message = one_line_error(text.load, "text-classification", tmp_path)
    assert f"{tmp_path / 'train.jsonl'} line 3" in message and expected in message, message


def test_jsonl_of_blank_lines_holds_no_examples(tmp_path):
    write(tmp_path, {"train.jsonl": "\n  \n", "test.jsonl": '{"text": "a", "label": 0}\n'})
    assert "holds no examples" in one_line_error(text.load, "text-classification", tmp_path)


# ----------------------------------------------------------------- bad files


def test_not_utf8_names_file_and_byte_offset(tmp_path):
    write(tmp_path, {"train.txt": "caf\xe9 ok\n".encode("latin-1"), "test.txt": "fine\n"})
    message = one_line_error(text.load, "text", tmp_path)
    assert str(tmp_path / "train.txt") in message and "byte offset 3" in message and "0xe9" in message


def test_not_utf8_offset_counts_the_bom(tmp_path):
    write(tmp_path, {"train.txt": b"\xef\xbb\xbfab\xffc", "test.txt": "fine\n"})
    assert "byte offset 5" in one_line_error(text.load, "text", tmp_path)


def test_bom_is_stripped(tmp_path):
    bom = "\ufeff".encode()
    write(
        tmp_path / "lm",
        {"train.txt": bom + "héllo\n".encode(), "test.txt": bom + b"x\n"},
    )
    corpus = text.load("text", tmp_path / "lm")
    assert corpus.splits["train"].text == "héllo\n" and corpus.splits["test"].text == "x\n"
    write(tmp_path / "cls", {"train.jsonl": bom + b'{"text": "a", "label": "b"}\n', "test.jsonl": bom + b"\n"})
    with pytest.raises(DatasetError, match="test.jsonl holds no examples"):  # the BOM is not a line of JSON
        text.load("text-classification", tmp_path / "cls")


@pytest.mark.parametrize(
    ("content", "expected"), [(b"", "is empty (0 bytes);"), (b"\xef\xbb\xbf", "nothing but a byte-order")]
)
def test_empty_file(tmp_path, content, expected):
    write(tmp_path, {"train.txt": "fine\n", "test.txt": content})
    message = one_line_error(text.load, "text", tmp_path)
    assert f"{tmp_path / 'test.txt'} is empty" in message and expected in message


def _load_in_thread(name, root):
    """Run load() in a daemon thread: (thread, outcome) — a blocked open() cannot hang the test."""
    outcome = {}

    def target():
        try:
            text.load(name, root)
        except Exception as e:  # reported to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=10)
    return thread, outcome


@pytest.mark.parametrize(("name", "fname"), [("text", "test.txt"), ("text-classification", "train.jsonl")])
def test_fifo_is_refused_without_blocking(tmp_path, name, fname):
    write(tmp_path, {"train.txt": "a\n", "test.txt": "b\n", "train.jsonl": "", "test.jsonl": ""})
    (tmp_path / fname).unlink()
    os.mkfifo(tmp_path / fname)
    thread, outcome = _load_in_thread(name, tmp_path)
    if thread.is_alive():  # blocked in open(): release it with a writer before failing
        os.close(os.open(tmp_path / fname, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"loading {name} blocked on a FIFO")
    error = outcome.get("error")
    assert isinstance(error, DatasetError), error
    assert f"{tmp_path / fname} is a FIFO, not a regular file" in str(error) and "\n" not in str(error)


@needs_fortunes
def test_fifo_among_fortune_files_is_refused(tmp_path):
    shutil.copy(FORTUNES / "goedel", tmp_path / "goedel")
    os.mkfifo(tmp_path / "pipe")
    thread, outcome = _load_in_thread("fortunes", tmp_path)
    if thread.is_alive():
        os.close(os.open(tmp_path / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("loading fortunes blocked on a FIFO")
    assert "pipe is a FIFO" in str(outcome.get("error"))


def test_device_file_is_refused(tmp_path):
    write(tmp_path, {"test.txt": "b\n"})
    (tmp_path / "train.txt").symlink_to("/dev/zero")  # would read forever
    message = one_line_error(text.load, "text", tmp_path)
    assert f"{tmp_path / 'train.txt'} is a character device" in message


def test_file_too_large_for_memory_is_refused_before_reading(tmp_path):
    write(tmp_path, {"test.txt": "b\n"})
    with open(tmp_path / "train.txt", "wb") as f:  # sparse: no disk used; far larger than the memory
        f.truncate(max(2**40, 4 * available_memory("cpu")))
    message = one_line_error(text.load, "text", tmp_path)
    assert f"{tmp_path / 'train.txt'} is too large to read into memory" in message and "available" in message


# ----------------------------------------------------------------- fortunes


def test_split_of_is_a_fixed_function_of_the_text():
    # pinned: a change of the hash, the seed or the fractions would silently move entries between splits
    golden = "TTTTSTSTTTTSTTVSTTTTTTTT"
    assert "".join({"train": "T", "valid": "V", "test": "S"}[text.split_of(f"entry {i}")] for i in range(24)) == golden
    counts = Counter(text.split_of(f"entry {i}") for i in range(10_000))
    assert counts == {"train": 8010, "valid": 1010, "test": 980}


def test_parse_fortunes():
    raw = "first\n  indented line\n%\n\n%\n\nsecond\n\n%\nthird, no final separator\n"
    assert text.parse_fortunes(raw) == ["first\n  indented line", "second", "third, no final separator"]


@needs_fortunes
def test_fortunes_split_is_by_whole_entries_and_deterministic():
    corpus = text.load("fortunes", FORTUNES)
    again = text.load("fortunes", FORTUNES)
    assert {k: s.text for k, s in corpus.splits.items()} == {k: s.text for k, s in again.splits.items()}
    assert corpus.info.task == "language-modeling"
    entries = {}
    for path in text._fortune_files(FORTUNES):
        for e in text.parse_fortunes(path.read_text(encoding="utf-8")):
            entries.setdefault(e, text.split_of(e))
    assert len(entries) > 10_000
    for split, part in corpus.splits.items():
        chosen = [e for e, s in entries.items() if s == split]
        assert part.text == "\n\n".join(chosen) + "\n"  # every entry of the split, whole, in file order
    sizes = Counter(entries.values())
    for split, fraction in zip(text.SPLITS, text.SPLIT_FRACTIONS):
        assert abs(sizes[split] / len(entries) - fraction) < 0.02, sizes


@needs_fortunes
def test_fortunes_split_does_not_depend_on_file_order_or_other_files(tmp_path):
    names = ["zippy", "goedel", "art", "paradoxum"]
    for order, folder in ((names, tmp_path / "a"), (names[::-1], tmp_path / "b")):
        folder.mkdir()
        for name in order:  # created in opposite orders: directory listings differ
            shutil.copy(FORTUNES / name, folder / name)
        (folder / f"{name}.dat").write_bytes(b"\0binary index")  # ignored
    a, b = text.load("fortunes", tmp_path / "a"), text.load("fortunes", tmp_path / "b")
    assert {k: s.text for k, s in a.splits.items()} == {k: s.text for k, s in b.splits.items()}
    full = text.load("fortunes", FORTUNES)
    for split, part in a.splits.items():  # a subset of the files: its entries stay in their splits
        for entry in part.text.split("\n\n")[:50]:
            assert entry.strip() in full.splits[split].text


@needs_fortunes
def test_fortunes_topics_keep_files_with_enough_entries():
    corpus = text.load("fortunes-topics", FORTUNES)
    assert corpus.info.task == "text-classification" and corpus.info.num_classes == len(corpus.class_names)
    assert "pratchett" not in corpus.class_names and "magic" not in corpus.class_names  # 2 and 30 entries
    assert "goedel" in corpus.class_names and "computers" in corpus.class_names  # 54 and 1050
    assert corpus.class_names == tuple(sorted(corpus.class_names))
    train, test = corpus.splits["train"], corpus.splits["test"]
    assert set(train.labels) == set(range(len(corpus.class_names)))
    assert not set(train.texts) & set(test.texts) and not set(train.texts) & set(corpus.splits["valid"].texts)
    for split, part in corpus.splits.items():
        assert all(text.split_of(e) == split for e in part.texts[:300])  # the same entry-level split
    counts = Counter(train.labels + test.labels + corpus.splits["valid"].labels)
    assert min(counts.values()) >= text.TOPIC_MIN_ENTRIES


def _topic(prefix: str, n: int) -> str:
    return "".join(f"{prefix} entry number {i}\n%\n" for i in range(n))


def test_topic_minimum_and_ambiguous_entries(tmp_path):
    m = text.TOPIC_MIN_ENTRIES
    write(
        tmp_path,
        {
            "big": _topic("big", m + 200) + "shared words\n%\n",
            "enough": _topic("enough", m - 1) + "shared words\n%\n",  # m distinct, one of them shared
            "small": _topic("small", m - 1),
            "exact": _topic("exact", m),
            "exact.dat": b"\x00\x01",
            "exact.u8": "ignored\n%\n",
        },
    )
    corpus = text.load("fortunes-topics", tmp_path)
    assert corpus.class_names == ("big", "exact")  # "enough" loses its shared entry and falls to m - 1
    everything = [t for s in corpus.splits.values() for t in s.texts]
    assert "shared words" not in everything and len(everything) == m + 200 + m
    assert len(text.locate("fortunes-topics", tmp_path).found) == 4


def test_fortunes_needs_fortune_files(tmp_path):
    assert "apt-get install fortunes" in one_line_error(text.load, "fortunes", tmp_path)
    write(tmp_path, {"one": "a single entry\n"})
    assert "no entry falls in the" in one_line_error(text.load, "fortunes", tmp_path)


@needs_fortunes
def test_fortunes_default_dir_and_locate():
    assert text.default_dir("fortunes") == os.environ.get("VARPRUNE_FORTUNES", str(FORTUNES))
    where = text.locate("fortunes", FORTUNES)
    assert where.complete and len(where.found) > 30
    assert not any(p.name.endswith((".dat", ".u8")) for p in where.found)


def test_registry_wiring():
    """Through data/registry.py once the integrator adds ``text`` to FAMILIES."""
    from varprune.data import registry

    if "fortunes" not in registry.DATASETS:
        pytest.skip("varprune.data.text is not in registry.FAMILIES yet")
    assert registry.dataset_info("text-classification").task == "text-classification"
    if (FORTUNES / "fortunes").is_file():
        corpus = registry.load_dataset("fortunes")
        assert isinstance(corpus, text.TextCorpus) and registry.locate_dataset("fortunes").complete
