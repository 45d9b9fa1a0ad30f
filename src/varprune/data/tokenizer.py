"""The tokenizer of the text family: a byte-level BPE trained on a corpus's training split, or a local
Hugging Face ``tokenizer.json``.

:func:`train_tokenizer` trains a byte-level BPE (GPT-2's pre-tokenizer, 256 byte symbols: every text encodes,
nothing is unknown) with Hugging Face ``tokenizers`` on the **training split only**. Training is deterministic:
the trainer has no randomness (no dropout), the input is fed in a fixed order, and the vocabulary's ids
(bytes sorted, merges in order) do not depend on hash order, so the same text gives a byte-identical
``tokenizer.json`` in any process and with any number of threads (tests/test_text.py checks it in a second
process). Special tokens, at fixed ids before the bytes and merges:

* ``<pad>`` = 0 (:data:`PAD_ID`): pads classification inputs to ``max_length``; the attention mask hides it.
* ``<cls>`` = 1 (:data:`CLS_ID`): put first by the post-processor when a classification input is encoded (a
  classifier may pool at position 0; mean pooling over the attention mask works as well).
* ``<eos>`` = 2 (:data:`EOS_ID`), only in a tokenizer trained on instruction records (data/instructions.py):
  it ends every example. Tokenizers trained on other text have no third special token, as before.

:attr:`TextTokenizer.eos_id` is the first of :data:`EOS_NAMES` that the vocabulary holds (``</s>`` for Llama
and Mistral, ``<|endoftext|>`` for GPT-2 and Qwen, ``<|end_of_text|>`` for Llama 3...): a function of the
``tokenizer.json`` alone, so that a run, its folder's copy and an exported model's copy agree on it.

Language modeling never adds a special token (:meth:`TextTokenizer.encode`): the stream is the text's tokens.

:meth:`TextTokenizer.save` writes ``tokenizer.json`` atomically; :func:`load_tokenizer` reads one back, or the
``tokenizer.json`` that a Hugging Face model folder ships (its ``tokenizer_config.json`` names the padding
token where the JSON does not). A loaded tokenizer's own truncation and padding settings are switched off: the
loaders here truncate and pad themselves.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from varprune.data.base import DatasetError
from varprune.data.identity import sha256_hex
from varprune.storage.files import atomic_write_text

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "CLS",
    "CLS_ID",
    "EOS",
    "EOS_ID",
    "EOS_NAMES",
    "MAX_VOCAB",
    "MIN_VOCAB",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "TextTokenizer",
    "load_tokenizer",
    "text_chunks",
    "train_tokenizer",
]

PAD, CLS = "<pad>", "<cls>"
SPECIAL_TOKENS = (PAD, CLS)  # their ids are their positions
PAD_ID, CLS_ID = 0, 1
EOS, EOS_ID = "<eos>", 2  # instruction corpora only
EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the 256 bytes, the special tokens and at least one merge
MAX_VOCAB = 1 << 20  # ids stay far inside int32; larger is no sane embedding table
TOKENIZER_FILE = "tokenizer.json"
CHUNK_CHARS = 1 << 16  # texts are encoded in pieces of about this many characters (see text_chunks)
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|endoftext|>")

# A cut between a character that is not whitespace and a space (U+0020) is a boundary of every pre-token
# under GPT-2's and Llama 3's splitting patterns, BERT's and SentencePiece's: no pre-token holds a
# non-space followed by a space. Encoding the pieces gives the tokens of the whole text.
_CUT = re.compile(r"\S ")


def text_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, cut only before a space that follows a
    non-space character, so that encoding the pieces one by one gives exactly the tokens of the whole text
    (tests/test_text.py checks it with cuts every few characters). A stretch without such a place stays
    whole."""
    pos, n = 0, len(text)
    while pos < n:
        m = _CUT.search(text, pos + size) if pos + size < n else None
        end = m.start() + 1 if m else n
        yield text[pos:end]
        pos = end


class TextTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with what the data layer needs: the vocabulary size, the
    padding id, encoding without special tokens (language modeling) or with them, truncated (classification).

    ``source`` says where it came from (a file, or "trained on ...") for messages; ``sha256`` the digest of the
    JSON it was read from (a file's bytes as they are on disk; None for one trained here).
    """

    def __init__(self, tokenizer, pad_id: int | None, source: str, sha256: str | None = None):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.source = source
        self.sha256 = sha256
        self._truncating: dict[int, Tokenizer] = {}  # copies that truncate, by max_length

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (an embedding table of this many rows covers every id)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id: the first of :data:`EOS_NAMES` in the vocabulary, or None."""
        for name in EOS_NAMES:
            found = self.tokenizer.token_to_id(name)
            if found is not None:
                return int(found)
        return None

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, no special token added (language modeling)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_pieces(self, pieces: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each piece (in parallel where ``tokenizers`` may use threads)."""
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(list(pieces), add_special_tokens=False)]

    def encode_examples(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Each text with the tokenizer's special tokens (``<cls>`` first for a trained one), truncated on the
        right to at most ``max_length`` ids, special tokens kept (classification). Not padded."""
        if max_length not in self._truncating:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(self.tokenizer.to_str())
            copy.enable_truncation(max_length, direction="right")
            self._truncating[max_length] = copy
        tok = self._truncating[max_length]
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=True)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of ``ids``; special tokens (``<pad>``, an EOS) left out with ``skip_special``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (the same tokenizer gives the same text)."""
        return self.tokenizer.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` atomically to ``path`` (a file name, or a folder to write it into);
        returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self.to_json())
        return path

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, source={self.source!r})"


def _training_pieces(corpus) -> tuple[list[str], str]:
    """What the trainer reads: the training split only (a TextCorpus), a text, or a list of texts."""
    if isinstance(corpus, str):
        return list(text_chunks(corpus)), "a text"
    if hasattr(corpus, "splits"):  # a text.TextCorpus: its training split and nothing else
        train = corpus.splits["train"]
        pieces = list(text_chunks(train.text)) if train.text is not None else list(train.texts)
        return pieces, f"{train.file} (the training split of {corpus.info.name})"
    return [str(t) for t in corpus], f"{len(corpus)} texts"


def train_tokenizer(corpus, vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """A byte-level BPE of at most ``vocab_size`` ids trained on ``corpus``: a ``TextCorpus`` (its training split
    only: valid and test are never seen), a text, or a list of texts. A merge needs ``min_frequency``
    occurrences, so a small text may give fewer ids than asked (:attr:`TextTokenizer.vocab_size` says how
    many). Deterministic: the same input gives a byte-identical ``tokenizer.json``. A corpus of instruction
    records (its training split's ``needs_eos``) gets :data:`EOS` at id :data:`EOS_ID` as a third special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    splits = getattr(corpus, "splits", None)
    special = SPECIAL_TOKENS + ((EOS,) if splits and getattr(splits["train"], "needs_eos", False) else ())
    least = MIN_VOCAB + len(special) - len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not least <= vocab_size <= MAX_VOCAB:
        raise DatasetError(
            f"vocab_size {vocab_size!r} is out of range: a byte-level BPE needs {least} to {MAX_VOCAB} ids "
            f"(256 bytes, {len(special)} special tokens, merges); e.g. 8192 for a small corpus"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise DatasetError(f"min_frequency must be a positive integer, not {min_frequency!r}")
    pieces, what = _training_pieces(corpus)
    if not any(p.strip() for p in pieces):
        raise DatasetError(f"cannot train a tokenizer on {what}: it holds no text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, CLS_ID)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    for i, name in enumerate(special):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return TextTokenizer(tok, PAD_ID, f"trained on {what}")


def _read_raw(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e.strerror or e}); check the file") from None


def _read_json(path: Path, what: str, raw: bytes | None = None) -> str:
    raw = _read_raw(path) if raw is None else raw
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 (byte offset {e.start}); it is not {what}") from None


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # transformers writes AddedToken as {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pad_id(tok, text: str, config: dict) -> int | None:
    """The padding id: tokenizer.json's padding, tokenizer_config.json's pad_token, a usual name, else the
    end-of-text token (as GPT-2 fine-tuning does; the attention mask hides padding anyway)."""
    try:
        padding = json.loads(text).get("padding")
    except (ValueError, AttributeError):
        padding = None
    candidates = []
    if isinstance(padding, dict) and isinstance(padding.get("pad_token"), str):
        candidates.append(padding["pad_token"])
    candidates += [_config_token(config, "pad_token"), *_PAD_NAMES, _config_token(config, "eos_token")]
    for name in candidates:
        if name is not None and tok.token_to_id(name) is not None:
            return int(tok.token_to_id(name))
    return None


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A tokenizer from a ``tokenizer.json`` file, or from a folder holding one: a run folder, or a local Hugging
    Face model folder (its ``tokenizer_config.json``, if present, names the padding token). A folder without
    ``tokenizer.json``, or a file that does not parse, is a one-line :class:`DatasetError`."""
    from tokenizers import Tokenizer

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            present = sorted(p.name for p in folder.iterdir() if p.is_file())[:6]
            raise DatasetError(
                f"{folder} has no {TOKENIZER_FILE} (it holds {', '.join(present) or 'no files'}); a Hugging Face "
                f"model folder with a fast tokenizer ships one; for a slow-only one (vocab.txt, spiece.model) "
                f"save it with transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
            )
    elif not path.is_file():
        raise DatasetError(f"tokenizer file {path} not found; pass a tokenizer.json or a folder holding one")
    raw = _read_raw(path)
    text = _read_json(path, "a tokenizer.json", raw)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for any malformed file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise DatasetError(
            f"{path} is not a tokenizer.json that Hugging Face tokenizers can read ({reason}); "
            f"retrain the tokenizer or copy the file again"
        ) from None
    config: dict = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(_read_json(config_path, "JSON"))
        except ValueError as e:
            raise DatasetError(f"{config_path} is not JSON ({e}); copy the model folder again") from None
        if not isinstance(config, dict):
            raise DatasetError(f"{config_path} is not a JSON object; copy the model folder again")
    return TextTokenizer(tok, _pad_id(tok, text, config), str(path), sha256_hex(raw))


def tokenizer_from_json(text: str, pad_id: int | None, source: str) -> TextTokenizer:
    """A tokenizer from its JSON text (an exported model's file carries it); one-line DatasetError if it does
    not parse."""
    from tokenizers import Tokenizer

    try:
        return TextTokenizer(Tokenizer.from_str(text), pad_id, source, sha256_hex(text))
    except Exception as e:  # tokenizers raises a bare Exception for any malformed text
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise DatasetError(f"the tokenizer of {source} does not parse ({reason}); export the model again") from None
