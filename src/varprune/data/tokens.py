"""Tokenized text on the device, the loaders that batch it, and calibration inputs for one-shot pruners.

:func:`tokenize` turns a :class:`~varprune.data.text.TextCorpus` into a :class:`TokenizedText`:

* language modeling: each split's text encoded once into a 1-D int64 token stream held on the device;
* classification: each split's texts encoded with the tokenizer's special tokens (``<cls>`` first for a trained
  tokenizer), truncated to ``max_length`` and padded with the pad id: ``input_ids`` (N, L), ``lengths`` (N,)
  and ``labels`` (N,), all int64 on the device;
* instruction tuning: each split's prompts and responses as examples of at most ``max_length`` tokens whose
  prompt carries no loss (data.instructtokens, which also has their loader and calibration inputs).

The bytes are estimated before anything large is allocated (host memory for the encoding, then the device
copy) and a set that cannot fit is a one-line :class:`DatasetError`.

Both loaders follow :class:`~varprune.data.loader.DeviceLoader`'s interface, so the training engine can drive
either: ``len()``, iteration of ``(x, y)``, ``generator`` (one seeded ``torch.Generator`` on the device; its
state is what a checkpoint saves, and restoring it gives the same batches bitwise), ``num_examples``,
``batch_size``, ``device``, ``train``, ``loss_weight(step)`` and ``rank``/``world`` sharding of a global batch
(every process draws the same windows or permutation and keeps its contiguous share; shares differ by at most
one). No host synchronisation per batch.

* :class:`TokenWindowLoader` (language modeling): x is (B, seq_len) int64 and y is the same tensor; the task
  shifts (predicts tokens 1..L-1 from 0..L-2: ``seq_len - 1`` predicted tokens per window).
* :class:`TokenExampleLoader` (classification): x is ``{"input_ids": (B, L), "attention_mask": (B, L)}`` (both
  int64, the mask 1 on real tokens, 0 on padding) and y the (B,) int64 labels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from varprune.data.base import DatasetError, DatasetInfo, gib
from varprune.data.instructtokens import (
    EncodedInstructions,
    InstructionLoader,
    encode_instructions,
    instruction_calibration,
)
from varprune.data.loader import share, subset
from varprune.data.tokenizer import CHUNK_CHARS, TextTokenizer, text_chunks
from varprune.device import available_memory, fits_on_device

__all__ = [
    "CALIBRATION_SEED",
    "EncodedExamples",
    "TokenExampleLoader",
    "TokenWindowLoader",
    "TokenizedText",
    "calibration_inputs",
    "encode_examples",
    "encode_stream",
    "text_loader",
    "tokenize",
]

CALIBRATION_SEED = 8642  # calibration draws use their own seed, not the run's: every run prunes with the same inputs
DEFAULT_MAX_LENGTH = 128
_GROUP = 32  # chunks encoded per call: ~2 MiB of text, so the encoder's per-token objects stay small
_BLOCK = 1 << 24  # tokens copied to the device at a time
_EXAMPLE_GROUP = 4096


@dataclass
class EncodedExamples:
    """A classification split: ``input_ids`` (N, L) padded with the pad id, ``lengths`` (N,) of real tokens,
    ``labels`` (N,), all int64 on one device."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def attention_mask(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """int64 (B, L): 1 where ``rows`` hold a real token, 0 on padding (computed on the device)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions < self.lengths[rows][:, None]).long()


@dataclass
class TokenizedText:
    """:func:`tokenize`'s result: ``streams`` (language modeling: split -> 1-D int64 tokens), ``examples``
    (classification: split -> :class:`EncodedExamples`) or ``instructions`` (instruction tuning: split ->
    :class:`~varprune.data.instructtokens.EncodedInstructions`), the tokenizer's ``vocab_size`` and ``pad_id``,
    ``files`` (split -> where its text came from, for messages) and ``digests`` (split -> the sha256 of what it
    was read from: data/identity.py)."""

    info: DatasetInfo
    vocab_size: int
    pad_id: int | None
    files: dict[str, str]
    digests: dict[str, str] = field(default_factory=dict)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    examples: dict[str, EncodedExamples] = field(default_factory=dict)
    max_length: int | None = None
    instructions: dict[str, EncodedInstructions] = field(default_factory=dict)

    @property
    def truncated(self) -> dict[str, int]:
        """Instruction tuning: split -> how many of its examples were cut at ``max_length`` (else empty)."""
        return {name: ex.truncated for name, ex in self.instructions.items()}

    @property
    def task(self) -> str:
        return self.info.task


def _check_host(nbytes: int, what: str) -> None:
    free = available_memory("cpu")
    if nbytes > free:
        raise DatasetError(
            f"encoding {what} may need {gib(nbytes)} of memory, {gib(free)} is available; "
            f"use a smaller text or a machine with more memory"
        )


def _check_device(nbytes: int, device: torch.device, what: str) -> None:
    if not fits_on_device(nbytes, device):
        raise DatasetError(
            f"{what} needs {gib(nbytes)} on {device}, more than half of its {gib(available_memory(device))} free; "
            f"use a smaller corpus or max_length, or a device with more memory"
        )


def encode_stream(
    tokenizer: TextTokenizer,
    text: str,
    device="cpu",
    what: str = "the text",
    num_bytes: int | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> torch.Tensor:
    """``text``'s tokens (no special token) as a 1-D int64 tensor on ``device``: the text is encoded in pieces
    cut where no pre-token can straddle (:func:`~varprune.data.tokenizer.text_chunks`), which gives the tokens
    of the whole text. ``num_bytes`` (its UTF-8 size, at least its token count for a byte-level BPE) sizes the
    host check; the device copy is checked at its exact size before it is made."""
    device = torch.device(device)
    _check_host(4 * (num_bytes if num_bytes is not None else 4 * len(text)), what)
    parts: list[np.ndarray] = []
    group: list[str] = []
    for chunk in itertools.chain(text_chunks(text, chunk_chars), [None]):  # the pieces, never all at once
        if chunk is not None:
            group.append(chunk)
        if group and (chunk is None or len(group) == _GROUP):
            parts += [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_pieces(group)]
            group = []
    n = sum(len(p) for p in parts)
    _check_device(8 * n, device, f"the {n} tokens of {what}")
    stream = torch.empty(n, dtype=torch.int64, device=device)
    pos = 0
    while parts:  # to the device in blocks of ~16M tokens: few copies, little extra host memory
        take, size = 0, 0
        while take < len(parts) and size < _BLOCK:
            size += len(parts[take])
            take += 1
        joined = torch.from_numpy(np.concatenate(parts[:take]))
        del parts[:take]
        stream[pos : pos + len(joined)].copy_(joined)
        pos += len(joined)
    return stream


def encode_examples(
    tokenizer: TextTokenizer, texts, labels, max_length: int = DEFAULT_MAX_LENGTH, device="cpu", what: str = "texts"
) -> EncodedExamples:
    """Texts encoded with the tokenizer's special tokens, truncated on the right to ``max_length`` and padded
    with its pad id; labels as given (class indices)."""
    device = torch.device(device)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DatasetError(f"max_length must be an integer of at least 2, not {max_length!r}")
    if tokenizer.pad_id is None:
        raise DatasetError(
            f"tokenizer {tokenizer.source} has no padding token (nor an end-of-text token to pad with); "
            f"train one with train_tokenizer or use a tokenizer that defines pad_token"
        )
    n = len(texts)
    nbytes = 8 * n * (max_length + 2)
    _check_host(nbytes, what)
    _check_device(nbytes, device, f"{n} examples of {max_length} tokens ({what})")
    ids = np.full((n, max_length), tokenizer.pad_id, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for start in range(0, n, _EXAMPLE_GROUP):
        for i, row in enumerate(tokenizer.encode_examples(texts[start : start + _EXAMPLE_GROUP], max_length)):
            ids[start + i, : len(row)] = row
            lengths[start + i] = len(row)
    return EncodedExamples(
        torch.from_numpy(ids).to(device),
        torch.from_numpy(lengths).to(device),
        torch.as_tensor(list(labels), dtype=torch.int64).to(device),
    )


def tokenize(corpus, tokenizer: TextTokenizer, device="cpu", max_length: int = DEFAULT_MAX_LENGTH) -> TokenizedText:
    """Every split of ``corpus`` (a TextCorpus) encoded once onto ``device``: token streams for language
    modeling, padded examples of ``max_length`` tokens for classification, examples of at most ``max_length``
    tokens for instruction tuning (kept on the CPU: their loader assembles each batch)."""
    files = {name: split.file for name, split in corpus.splits.items()}
    digests = {name: split.sha256 for name, split in corpus.splits.items() if split.sha256 is not None}
    out = TokenizedText(corpus.info, tokenizer.vocab_size, tokenizer.pad_id, files, digests)
    for name, split in corpus.splits.items():
        if getattr(split, "prompts", None) is not None:  # an instructions.InstructionSplit
            out.instructions[name] = encode_instructions(tokenizer, split, max_length)
            out.max_length = max_length
        elif split.text is not None:
            out.streams[name] = encode_stream(tokenizer, split.text, device, split.file, split.num_bytes)
        else:
            out.examples[name] = encode_examples(tokenizer, split.texts, split.labels, max_length, device, split.file)
            out.max_length = max_length
    return out


def _positive(value, what: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise DatasetError(f"{what} must be an integer of at least {least}, not {value!r}")
    return value


def _check_shard(rank: int, world: int) -> tuple[int, int]:
    rank, world = int(rank), int(world)
    if world < 1 or not 0 <= rank < world:
        raise DatasetError(f"rank {rank} of world {world} is not a process of the run")
    return rank, world


class _Batches:
    """What both loaders share with DeviceLoader: the epoch's extent, the last-batch rule and loss weights."""

    batch_size: int
    train: bool
    rank: int
    world: int

    @property
    def num_examples(self) -> int:  # each loader says how many windows or examples its split has
        raise NotImplementedError

    def _stops(self) -> int:
        """Training drops a last batch that would leave some process fewer than 2 examples (as DeviceLoader)."""
        n = self.num_examples
        last = n % self.batch_size
        if self.train and n > 1 and 0 < last < 2 * self.world:
            return n - last
        return n

    def _span(self) -> tuple[int, int]:
        return (0, self._stops()) if self.train else share(self._stops(), self.rank, self.world)

    def __len__(self) -> int:
        lo, hi = self._span()
        return -(-(hi - lo) // self.batch_size)

    def loss_weight(self, step: int) -> float:
        """n_share * world / n_global for training batch ``step``: 1.0 unless the global batch splits unevenly."""
        n = min(self.batch_size, self._stops() - step * self.batch_size)
        lo, hi = share(n, self.rank, self.world)
        return (hi - lo) * self.world / n


class TokenWindowLoader(_Batches):
    """Windows of ``seq_len`` tokens from a 1-D int64 ``stream``; batches ``(x, x)`` of shape (B, seq_len).

    Training: an epoch is ``num_windows`` windows (default ``len(stream) // seq_len``; ``--limit-train`` counts
    windows), whose start positions are drawn uniformly from every valid offset, with replacement, by one
    ``torch.randint`` on the device at the start of the epoch from ``generator`` (seeded by ``seed``). Windows
    thus cover every alignment of the text; an epoch is a number of windows, not one pass over it.

    Evaluation: the stream cut into ``floor(len / seq_len)`` non-overlapping windows in order, the last partial
    window dropped (the first ``num_windows`` of them if given), each process taking a contiguous share.

    ``name`` (the split's file) is named when the stream is shorter than one window.
    """

    def __init__(
        self,
        stream: torch.Tensor,
        seq_len: int,
        batch_size: int,
        train: bool,
        device=None,
        seed: int = 0,
        num_windows: int | None = None,
        rank: int = 0,
        world: int = 1,
        name: str = "the token stream",
        info: DatasetInfo | None = None,
    ):
        self.seq_len = _positive(seq_len, "seq_len", 2)
        self.batch_size = _positive(batch_size, "batch_size")
        self.rank, self.world = _check_shard(rank, world)
        self.device = torch.device(device) if device is not None else stream.device
        self.stream = stream.to(self.device, torch.int64).reshape(-1)
        self.train, self.info, self.name = bool(train), info, name
        n = len(self.stream)
        if n < self.seq_len:
            raise DatasetError(
                f"{name} holds {n} tokens, fewer than one window of seq_len {self.seq_len}; "
                f"use a longer text or a smaller seq_len"
            )
        full = n // self.seq_len
        if num_windows is None:
            self.num_windows = full
        else:
            limit = _positive(num_windows, "num_windows")
            self.num_windows = limit if self.train else min(limit, full)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.offsets = torch.arange(self.seq_len, device=self.device)

    @property
    def num_examples(self) -> int:
        return self.num_windows

    @property
    def tokens_per_window(self) -> int:
        """Predicted tokens per window (``seq_len - 1``): the perplexity denominator is windows x this."""
        return self.seq_len - 1

    def __iter__(self):
        first, stop = self._span()
        if self.train:
            high = len(self.stream) - self.seq_len + 1
            starts = torch.randint(high, (self.num_windows,), device=self.device, generator=self.generator)
            for begin in range(first, stop, self.batch_size):
                idx = starts[begin : min(begin + self.batch_size, stop)]  # the global batch
                lo, hi = share(len(idx), self.rank, self.world)
                x = self.stream[idx[lo:hi, None] + self.offsets]
                yield x, x
        else:
            windows = self.stream[: (len(self.stream) // self.seq_len) * self.seq_len].view(-1, self.seq_len)
            for begin in range(first, stop, self.batch_size):
                x = windows[begin : min(begin + self.batch_size, stop)]
                yield x, x


class TokenExampleLoader(_Batches):
    """Batches of encoded examples: x ``{"input_ids", "attention_mask"}`` (B, L) int64, y (B,) int64 labels.

    Training shuffles with ``randperm`` on the device from ``generator`` each epoch (as DeviceLoader);
    evaluation visits the process's contiguous share in order.
    """

    def __init__(
        self,
        examples: EncodedExamples,
        batch_size: int,
        train: bool,
        device=None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        info: DatasetInfo | None = None,
    ):
        self.batch_size = _positive(batch_size, "batch_size")
        self.rank, self.world = _check_shard(rank, world)
        self.device = torch.device(device) if device is not None else examples.input_ids.device
        parts = (examples.input_ids, examples.lengths, examples.labels)
        self.examples = EncodedExamples(*(t.to(self.device) for t in parts))
        if len(self.examples) == 0:
            raise DatasetError("a text classification split holds no examples")
        self.train, self.info = bool(train), info
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _batch(self, rows):
        ex = self.examples
        return {"input_ids": ex.input_ids[rows], "attention_mask": ex.attention_mask(rows)}, ex.labels[rows]

    def __iter__(self):
        first, stop = self._span()
        order = None
        if self.train:
            order = torch.randperm(self.num_examples, device=self.device, generator=self.generator)
        for begin in range(first, stop, self.batch_size):
            end = min(begin + self.batch_size, stop)
            if order is None:
                yield self._batch(slice(begin, end))
            else:
                idx = order[begin:end]  # the global batch
                lo, hi = share(len(idx), self.rank, self.world)
                yield self._batch(idx[lo:hi])


def text_loader(
    data: TokenizedText,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    seq_len: int | None = None,
    limit: int | None = None,
    rank: int = 0,
    world: int = 1,
    device=None,
):
    """The loader of ``split`` for ``data``'s task. Language modeling needs ``seq_len``; ``limit`` counts
    windows (training: windows per epoch; evaluation: the first ``limit`` windows). Classification: ``limit``
    keeps the fixed subset of ``limit`` examples that :func:`~varprune.data.loader.subset` picks for images."""
    if split not in data.files:
        raise DatasetError(f"{data.info.name} has no {split!r} split (it has {', '.join(data.files)})")
    if data.streams:
        if seq_len is None:
            raise DatasetError("a language-modeling loader needs seq_len")
        name = f"{data.files[split]} ({split} split)"
        stream = data.streams[split]
        return TokenWindowLoader(stream, seq_len, batch_size, train, device, seed, limit, rank, world, name, data.info)
    if data.instructions:
        records = data.instructions[split]
        if limit is not None and limit < len(records):  # the same fixed subset rule as classification's
            records = records.select(subset(torch.arange(len(records)), torch.arange(len(records)), limit,
                                            salt=0 if train else 1)[0].numpy())  # fmt: skip
        return InstructionLoader(records, batch_size, train, device, seed, rank, world, data.info)
    ex = data.examples[split]
    if limit is not None and limit < len(ex):
        keep, _ = subset(torch.arange(len(ex)), torch.arange(len(ex)), limit, salt=0 if train else 1)
        keep = keep.to(ex.labels.device)
        ex = EncodedExamples(ex.input_ids[keep], ex.lengths[keep], ex.labels[keep])
    return TokenExampleLoader(ex, batch_size, train, device, seed, rank, world, data.info)


def stream_windows(stream: torch.Tensor, n: int, seq_len: int, name, seed: int = CALIBRATION_SEED) -> list:
    """``n`` windows of ``seq_len`` tokens of ``stream`` at uniform random offsets drawn by a CPU generator
    seeded with ``seed``, each a (1, seq_len) copy; ``name`` (the text's file) is named when it is too short."""
    n = _positive(n, "the number of calibration inputs")
    _positive(seq_len, "seq_len", 2)
    if len(stream) < seq_len:
        raise DatasetError(f"{name} holds {len(stream)} tokens, fewer than one calibration window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(stream) - seq_len + 1, (n,), generator=g).tolist()
    return [stream[s : s + seq_len].clone().unsqueeze(0) for s in starts]


def calibration_inputs(data: TokenizedText, n: int, seq_len: int | None = None, seed: int = CALIBRATION_SEED) -> list:
    """``n`` model inputs from the TRAINING split for a one-shot pruner, drawn with a fixed seed by a CPU
    generator (the same draws on any device): language modeling, ``n`` windows of ``seq_len`` tokens at
    uniform random offsets, each a (1, seq_len) int64 tensor; classification, ``n`` distinct examples, each
    ``{"input_ids": (1, L), "attention_mask": (1, L)}``; instruction tuning, ``n`` distinct examples as such
    dicts, unpadded (1, l), cut to ``seq_len``. On the data's device; copies, not views."""
    n = _positive(n, "the number of calibration inputs")
    g = torch.Generator().manual_seed(seed)
    if data.streams:
        if seq_len is None:
            raise DatasetError("language-modeling calibration inputs need seq_len")
        return stream_windows(data.streams["train"], n, seq_len, data.files["train"], seed)
    if data.instructions:  # whole training examples (prompt and response), unpadded, cut to seq_len
        return instruction_calibration(data.instructions["train"], n, seq_len, seed)
    ex = data.examples["train"]
    if n > len(ex):
        raise DatasetError(f"{n} calibration examples asked, {data.files['train']} holds {len(ex)}")
    rows = torch.randperm(len(ex), generator=g)[:n].tolist()
    return [
        {"input_ids": ex.input_ids[i : i + 1].clone(), "attention_mask": ex.attention_mask(slice(i, i + 1))}
        for i in rows
    ]
