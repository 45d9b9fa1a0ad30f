"""The tokenizer: byte-level BPE trained deterministically on the training split only, its special tokens,
saving and loading (Hugging Face model folders too), one-line errors, and encoding in pieces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from text_helpers import PIECES_SAMPLES, TRAIN_TEXT, WORDS, cls_corpus, llama3_style_tokenizer, lm_corpus, one_line
from varprune.data import tokenizer
from varprune.data.tokenizer import CLS_ID, PAD_ID, load_tokenizer, text_chunks, train_tokenizer

SRC = Path(tokenizer.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TRAIN_TEXT, 400)


# ----------------------------------------------------------------- tokenizer


def test_special_tokens_and_vocab(tok):
    assert tok.pad_id == PAD_ID == 0 and tok.tokenizer.token_to_id("<cls>") == CLS_ID == 1
    assert 256 + 2 < tok.vocab_size <= 400
    ids = tok.encode("the lazy dog")
    assert CLS_ID not in ids and PAD_ID not in ids and tok.decode(ids) == "the lazy dog"
    assert tok.encode_examples(["the lazy dog"], 64)[0] == [CLS_ID, *ids]  # classification: <cls> first
    assert tok.encode("ünïcödé ✓ 😀") and tok.decode(tok.encode("ünïcödé ✓ 😀")) == "ünïcödé ✓ 😀"  # bytes


def test_training_is_deterministic_across_processes(tmp_path, tok):
    assert train_tokenizer(TRAIN_TEXT, 400).to_json() == tok.to_json()
    script = (
        "import sys; from varprune.data.tokenizer import train_tokenizer; "
        "train_tokenizer(open(sys.argv[1], encoding='utf-8').read(), 400).save(sys.argv[2])"
    )
    (tmp_path / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONHASHSEED="12345", RAYON_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", script, tmp_path / "train.txt", tmp_path], env=env, check=True)
    assert (tmp_path / "tokenizer.json").read_text() == tok.to_json()


def test_trained_on_the_training_split_only(tmp_path):
    rare = " zyxwvutsrq"
    corpus = lm_corpus(tmp_path / "a", test=(WORDS + rare) * 30)
    assert len(train_tokenizer(corpus, 400).encode(rare)) > 1  # seen in test only: no merge for it
    corpus = lm_corpus(tmp_path / "b", train=TRAIN_TEXT + rare * 30)
    assert len(train_tokenizer(corpus, 400).encode(rare)) == 1
    corpus = cls_corpus(tmp_path / "c")
    assert len(train_tokenizer(corpus, 300).encode(" word")) == 1


def test_vocab_size_range():
    for bad in (0, 258, tokenizer.MAX_VOCAB + 1, 512.0, True):
        assert "vocab_size" in one_line(train_tokenizer, TRAIN_TEXT, bad)
    assert "holds no text" in one_line(train_tokenizer, "   \n", 300)


def test_save_and_load_round_trip(tmp_path, tok):
    written = tok.save(tmp_path)
    assert written == tmp_path / "tokenizer.json" and sorted(os.listdir(tmp_path)) == ["tokenizer.json"]
    back = load_tokenizer(tmp_path)
    assert back.to_json() == tok.to_json() and back.pad_id == tok.pad_id and back.vocab_size == tok.vocab_size
    assert back.encode(WORDS) == tok.encode(WORDS)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("fox") == tok.encode("fox")
    tok.save(tmp_path / "other.json")
    assert (tmp_path / "other.json").read_text() == written.read_text()


def test_hugging_face_model_folder(tmp_path, tok):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_json()), pad_token="<pad>")
    fast.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{}")
    loaded = load_tokenizer(tmp_path / "model")
    assert loaded.encode(WORDS) == tok.encode(WORDS) and loaded.pad_id == 0
    # a WordPiece folder whose padding token is named only in tokenizer_config.json
    vocab = {"[UNK]": 0, "[CLS]": 1, "hello": 2, "world": 3, "<blank>": 4}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.enable_truncation(2)  # a shipped truncation setting must not cut the stream
    (tmp_path / "wp").mkdir()
    wp.save(str(tmp_path / "wp" / "tokenizer.json"))
    (tmp_path / "wp" / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<blank>"}}))
    loaded = load_tokenizer(tmp_path / "wp")
    assert loaded.pad_id == 4 and loaded.encode("hello world hello") == [2, 3, 2]


def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("a\n")
    message = one_line(load_tokenizer, tmp_path)
    assert f"{tmp_path} has no tokenizer.json" in message and "vocab.txt" in message
    assert "not found" in one_line(load_tokenizer, tmp_path / "missing.json")


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', '{"a": 1}', "\xff\xfe"])
def test_broken_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content.encode("latin-1"))
    message = one_line(load_tokenizer, tmp_path)
    assert str(tmp_path / "tokenizer.json") in message


@pytest.mark.parametrize("size", [1, 3, 17, 200])
def test_encoding_in_pieces_equals_encoding_whole(tok, size):
    for encoder in (tok, llama3_style_tokenizer()):
        for sample in PIECES_SAMPLES:
            pieces = list(text_chunks(sample, size))
            assert "".join(pieces) == sample and len(pieces) > 5
            assert [i for p in pieces for i in encoder.encode(p)] == encoder.encode(sample)
