"""Instruction records encoded for supervised fine-tuning: the examples, their batches and calibration inputs.

:func:`encode_instructions` turns an :class:`~varprune.data.instructions.InstructionSplit` into
:class:`EncodedInstructions`. An example is the prompt's text followed by the response's, encoded together
without special tokens, and then the tokenizer's end-of-sequence token (:attr:`TextTokenizer.eos_id
<varprune.data.tokenizer.TextTokenizer.eos_id>`); its first ``len(encode(prompt))`` tokens (the prompt encoded
alone, no special tokens) are the prompt and carry no loss, as in Alpaca-LoRA's ``train_on_inputs=False``.
An example longer than ``max_length`` (``--seq-len``) is cut on the right and counted in
:attr:`EncodedInstructions.truncated`; one whose prompt leaves no response token inside ``max_length`` is a
one-line :class:`DatasetError` naming its file, record and line.

:class:`InstructionLoader` follows the interface of the other loaders (data.tokens): ``len()``, iteration of
``(x, y)``, ``generator`` (the checkpointed state: one CPU generator, so that the batches' composition is
known on the host and no device synchronisation is needed), ``num_examples``, ``batch_size``, ``device``,
``train``, ``loss_weight(step)`` and ``rank``/``world`` shares of a global batch. x is ``{"input_ids",
"attention_mask"}`` (B, L) int64 and y the (B, L) int64 labels: the token id at response positions (the EOS
included), :data:`IGNORE_INDEX` (-100) at prompt and padding positions. L is the longest example of the batch
(of the process's share): right padding with the pad id, hidden by the attention mask. To keep padding small,
examples are sorted by length within windows of :data:`SORT_WINDOW` batches; training shuffles the examples
each epoch, then the order of a window's full batches.

Tokens stay on the host and each batch is assembled there and copied to the device (pinned, asynchronous on
a GPU): a few kilobytes per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from varprune.data.base import DatasetError, gib
from varprune.data.loader import share
from varprune.data.tokenizer import EOS_NAMES
from varprune.device import available_memory

__all__ = [
    "IGNORE_INDEX",
    "SORT_WINDOW",
    "EncodedInstructions",
    "InstructionLoader",
    "encode_instructions",
    "instruction_batches",
    "instruction_calibration",
]

IGNORE_INDEX = -100  # the label of a position that carries no loss (torch's cross_entropy default)
SORT_WINDOW = 32  # batches whose examples are sorted by length together
_GROUP = 4096  # records encoded per call


@dataclass
class EncodedInstructions:
    """A split's examples: ``tokens`` (every example's ids one after the other, int64 on the CPU), and per
    example ``starts``, ``lengths`` and ``prompt_lengths`` (int64 numpy arrays); ``pad_id`` pads batches;
    ``truncated`` counts the examples cut at ``max_length``; ``file`` names where they came from."""

    tokens: torch.Tensor
    starts: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    pad_id: int
    max_length: int
    file: str
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def response_tokens(self) -> int:
        """Tokens that carry loss (each example's response and EOS, as kept)."""
        return int((self.lengths - self.prompt_lengths).sum())

    def select(self, rows) -> EncodedInstructions:
        """The examples ``rows`` (indices), sharing the tokens."""
        rows = np.asarray(rows, dtype=np.int64)
        return EncodedInstructions(
            self.tokens,
            self.starts[rows],
            self.lengths[rows],
            self.prompt_lengths[rows],
            self.pad_id,
            self.max_length,
            self.file,
            self.truncated,
        )

    def example(self, i: int, max_length: int | None = None) -> torch.Tensor:
        """Example ``i``'s ids (1-D), cut to ``max_length`` if given."""
        n = int(self.lengths[i]) if max_length is None else min(int(self.lengths[i]), max_length)
        return self.tokens[int(self.starts[i]) : int(self.starts[i]) + n]

    def batch(self, rows, device=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Examples ``rows`` padded to the longest of them: ``({"input_ids", "attention_mask"}, labels)``, (B, L)
        int64 each, on ``device`` (see the module docstring)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = torch.from_numpy(self.lengths[rows])
        prompts = torch.from_numpy(self.prompt_lengths[rows])
        width = int(lengths.max()) if len(rows) else 0
        pos = torch.arange(width)
        real = pos < lengths[:, None]
        idx = torch.from_numpy(self.starts[rows])[:, None] + torch.minimum(pos, (lengths - 1).clamp(min=0)[:, None])
        ids = torch.where(real, self.tokens[idx], torch.tensor(self.pad_id))
        labels = torch.where(real & (pos >= prompts[:, None]), ids, torch.tensor(IGNORE_INDEX))
        parts: tuple[torch.Tensor, ...] = (ids, real.long(), labels)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            parts = tuple(p.pin_memory().to(device, non_blocking=True) for p in parts)
        elif device.type != "cpu":
            parts = tuple(p.to(device) for p in parts)
        return {"input_ids": parts[0], "attention_mask": parts[1]}, parts[2]


def encode_instructions(tokenizer, split, max_length: int) -> EncodedInstructions:
    """``split``'s records (an InstructionSplit) as examples of at most ``max_length`` tokens (module docstring)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DatasetError(f"max_length must be an integer of at least 2, not {max_length!r}")
    eos = tokenizer.eos_id
    if eos is None:
        raise DatasetError(
            f"tokenizer {tokenizer.source} has no end-of-sequence token (none of {', '.join(EOS_NAMES)}); "
            f"instruction examples end with one: use a tokenizer that has one"
        )
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
    n = len(split.prompts)
    estimate = 8 * 2 * (split.num_bytes + 256 * n)  # tokens <= bytes for a byte-level BPE; the template adds ~200
    free = available_memory("cpu")
    if estimate > free:
        raise DatasetError(
            f"encoding {split.file} may need {gib(estimate)} of memory, {gib(free)} is available; "
            f"use a smaller file or a machine with more memory"
        )
    parts: list[np.ndarray] = []
    lengths = np.zeros(n, dtype=np.int64)
    prompt_lengths = np.zeros(n, dtype=np.int64)
    truncated = 0
    for start in range(0, n, _GROUP):
        prompts = split.prompts[start : start + _GROUP]
        full = [p + r for p, r in zip(prompts, split.responses[start : start + _GROUP])]
        for k, (ids, prompt) in enumerate(zip(tokenizer.encode_pieces(full), tokenizer.encode_pieces(prompts))):
            i = start + k
            ids = [*ids, eos]
            kept = min(len(ids), max_length)
            if len(prompt) >= kept:
                raise DatasetError(
                    f"{split.where(i)}: its prompt is {len(prompt)} tokens, which leaves no response token within "
                    f"--seq-len/--max-length {max_length}; raise it or shorten the record"
                )
            truncated += len(ids) > max_length
            parts.append(np.asarray(ids[:kept], dtype=np.int64))
            lengths[i], prompt_lengths[i] = kept, len(prompt)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)
    return EncodedInstructions(tokens, starts, lengths, prompt_lengths, int(pad), max_length, split.file, truncated)


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{what} must be an integer of at least 1, not {value!r}")
    return value


class InstructionLoader:
    """Batches of instruction examples padded to their longest, sorted by length within windows (module
    docstring). Training: a new shuffle each epoch from ``generator`` (CPU, seeded by ``seed``); a last batch
    that would leave some process fewer than 2 examples is dropped (as every loader). Evaluation: the
    process's contiguous share of the examples, each window sorted, nothing dropped."""

    def __init__(
        self,
        examples: EncodedInstructions,
        batch_size: int,
        train: bool,
        device=None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        info=None,
        window: int = SORT_WINDOW,
    ):
        self.batch_size = _positive(batch_size, "batch_size")
        self.window = _positive(window, "window")
        self.rank, self.world = int(rank), int(world)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise DatasetError(f"rank {rank} of world {world} is not a process of the run")
        if len(examples) == 0:
            raise DatasetError(f"{examples.file} holds no examples")
        self.examples, self.train, self.info = examples, bool(train), info
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch: list[np.ndarray] = []  # the global batches of the epoch being iterated (loss_weight)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _stops(self) -> int:
        n = self.num_examples
        last = n % self.batch_size
        if self.train and n > 1 and 0 < last < 2 * self.world:
            return n - last
        return n

    def __len__(self) -> int:
        lo, hi = (0, self._stops()) if self.train else share(self._stops(), self.rank, self.world)
        return -(-(hi - lo) // self.batch_size)

    def loss_weight(self, step: int) -> float:
        """t_share * world / t_global for training batch ``step`` of the epoch being iterated, t counting the
        response tokens (those that carry loss): each process averages its loss over its own share's, so this
        weight makes the processes' mean gradient the gradient of the mean over the global batch's."""
        rows = self._epoch[step]
        counts = self.examples.lengths[rows] - self.examples.prompt_lengths[rows]  # each > 0
        lo, hi = share(len(rows), self.rank, self.world)
        return float(counts[lo:hi].sum()) * self.world / float(counts.sum())

    def batches(self) -> list[np.ndarray]:
        """This epoch's global batches as example indices (draws from ``generator`` when training)."""
        if self.train:
            order = torch.randperm(self.num_examples, generator=self.generator)[: self._stops()].numpy()
        else:
            order = np.arange(*share(self._stops(), self.rank, self.world))
        size, out = self.batch_size, []
        for begin in range(0, len(order), size * self.window):
            chunk = order[begin : begin + size * self.window]
            chunk = chunk[np.argsort(-self.examples.lengths[chunk], kind="stable")]  # longest first
            group = [chunk[i : i + size] for i in range(0, len(chunk), size)]
            full = len(group) - (len(group[-1]) < size)  # a partial batch stays last
            if self.train and full > 1:
                group[:full] = [group[j] for j in torch.randperm(full, generator=self.generator).tolist()]
            out += group
        return out

    def __iter__(self):
        self._epoch = self.batches()
        for rows in self._epoch:
            if self.train:  # the global batch: this process's contiguous share
                lo, hi = share(len(rows), self.rank, self.world)
                rows = rows[lo:hi]
            yield self.examples.batch(rows, self.device)


def instruction_calibration(examples: EncodedInstructions, n: int, seq_len: int | None, seed: int) -> list:
    """``n`` distinct examples (prompt, response and EOS: the whole example), drawn with ``seed`` by a CPU
    generator, each ``{"input_ids": (1, l), "attention_mask": (1, l)}`` on the CPU, unpadded and cut to
    ``seq_len`` tokens if given."""
    n = _positive(n, "the number of calibration inputs")
    if n > len(examples):
        raise DatasetError(f"{n} calibration examples asked, {examples.file} holds {len(examples)}")
    rows = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    out = []
    for i in rows:
        ids = examples.example(i, seq_len).clone().unsqueeze(0)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def instruction_batches(examples: EncodedInstructions, n: int, batch_size: int, seed: int, device) -> list[tuple]:
    """A fixed random subset of ``n`` examples (``seed``) as ``(x, labels)`` batches of ``batch_size``, each padded
    to its longest: what the analysis measures the training loss on."""
    rows = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    return [examples.batch(rows[i : i + batch_size], device) for i in range(0, len(rows), batch_size)]
