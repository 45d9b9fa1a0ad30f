"""--calib-data files (data/calibtext.py): C4's protocol for JSON lines (one window from one document longer than the
window, as Wanda's and SparseGPT's code draw them), the whole stream for plain text, the line index, bad files."""

import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from varprune.data import DatasetError, calibration_windows, calibtext, train_tokenizer
from varprune.data.calibtext import MAX_DRAWS_PER_INPUT, line_starts

SEQ = 16
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wise"]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(1)
    return train_tokenizer([" ".join(rng.choices(WORDS, k=40)) for _ in range(200)], 300)


def documents(n_short=40, n_long=6, seed=0):
    """Short documents (a few tokens) and a few long ones, each long one distinct (a number in every word)."""
    rng = random.Random(seed)
    short = [" ".join(rng.choices(WORDS, k=2)) for _ in range(n_short)]
    long = [" ".join(f"{w}{d}{i}" for i, w in enumerate(rng.choices(WORDS, k=60))) for d in range(n_long)]
    docs = short + long
    rng.shuffle(docs)
    return docs


def write_jsonl(path, docs, blank_lines=True, trailing_newline=True):
    lines = [json.dumps({"text": d, "url": "u", "timestamp": "t"}) for d in docs]
    if blank_lines:
        lines[3:3] = ["", "   "]
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def ids_of(tok, text):  # the tokenizers library itself, not varprune's wrapper
    return Tokenizer.from_str(tok.tokenizer.to_str()).encode(text, add_special_tokens=False).ids


def test_each_window_is_cut_from_one_document_longer_than_the_window(tok, tmp_path):
    docs = documents()
    path = write_jsonl(tmp_path / "c4.jsonl", docs)
    windows = calibration_windows(path, tok, 12, SEQ, seed=5)
    encoded = [ids_of(tok, d) for d in docs]
    long = [ids for ids in encoded if len(ids) > SEQ]
    assert 0 < len(long) < len(docs)  # short documents are there to be skipped
    used = set()
    for w in windows:
        assert w.shape == (1, SEQ) and w.dtype == torch.int64
        window = w[0].tolist()
        sources = [
            (k, at) for k, ids in enumerate(long) for at in range(len(ids) - SEQ) if ids[at : at + SEQ] == window
        ]
        assert sources, "a window that is no slice of one long document (offsets 0 .. L - seq_len - 1)"
        used.add(sources[0][0])
    assert len(used) > 1  # drawn from several documents
    again = calibration_windows(path, tok, 12, SEQ, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(windows, again))  # seeded: the same draws every time
    other = calibration_windows(path, tok, 12, SEQ, seed=6)
    assert not all(torch.equal(a, b) for a, b in zip(windows, other))


def test_plain_text_windows_are_slices_of_the_whole_stream(tok, tmp_path):
    text = "\n\n".join(documents())
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    stream = " " + " ".join(map(str, ids_of(tok, text))) + " "
    for w in calibration_windows(path, tok, 8, SEQ, seed=0):
        assert " " + " ".join(map(str, w[0].tolist())) + " " in stream


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("trailing", [True, False])
def test_line_starts_match_python_at_any_chunk_size(tmp_path, monkeypatch, chunk, trailing):
    monkeypatch.setattr(calibtext, "_CHUNK", chunk)
    path = write_jsonl(tmp_path / "d.jsonl", documents(8, 2), trailing_newline=trailing)
    raw = path.read_bytes()
    expected = [0] + [i + 1 for i, b in enumerate(raw) if b == 0x0A]
    if expected[-1] != len(raw):
        expected.append(len(raw))
    with open(path, "rb") as f:
        assert np.array_equal(line_starts(f, path), np.array(expected))


def test_too_few_long_documents_is_one_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", documents(n_short=30, n_long=0))
    with pytest.raises(DatasetError, match=f"{MAX_DRAWS_PER_INPUT * 3} documents drawn gave 0 of the 3") as e:
        calibration_windows(path, tok, 3, SEQ, seed=0)
    assert "--calib-seq-len" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"text": "a b"}\nnot json\n', "line 2 is not JSON"),
        (b'{"txt": "a b"}\n', 'line 1 has no string field "text"'),
        (b'["a", "b"]\n', 'line 1 has no string field "text"'),
        (b'{"text": "caf\xe9"}\n', "line 1 is not UTF-8 (byte offset 13)"),
        (b"", "is empty"),
    ],
)
def test_bad_lines_name_the_file_and_line(tok, tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        calibration_windows(path, tok, 40, SEQ, seed=0)


def test_a_file_of_blank_lines_holds_no_document(tok, tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="holds no document"):
        calibration_windows(path, tok, 2, SEQ, seed=0)


def test_a_bad_byte_after_a_byte_order_mark_is_located_in_the_file(tok, tmp_path):
    path = tmp_path / "bom-bad.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xe9"}\n')  # the bad byte at offset 3 + 13
    with pytest.raises(DatasetError, match=r"line 1 is not UTF-8 \(byte offset 16\)"):
        calibration_windows(path, tok, 1, SEQ, seed=0)


def test_a_byte_order_mark_is_not_part_of_the_first_document(tok, tmp_path):
    doc = " ".join(f"w{i}" for i in range(80))
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": doc}).encode() + b"\n")
    (w,) = calibration_windows(path, tok, 1, SEQ, seed=0)
    assert " ".join(map(str, w[0].tolist())) in " ".join(map(str, ids_of(tok, doc)))
