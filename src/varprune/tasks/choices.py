"""Multiple-choice accuracy of a causal language model, scored as lm-eval-harness scores ``loglikelihood``.

For each choice, the request is ``(context, continuation)``. As lm-eval's ``HFLM._encode_pair`` does, trailing
whitespace of the context is moved to the front of the continuation, the two are encoded **together**, and the
continuation's tokens are those after the context's own token count (so a merge across the boundary is scored
as the tokenizer makes it). An empty context is replaced by a prefix token (lm-eval: the end-of-text token). The
model reads ``(context + continuation)[-(max_length + 1):][:-1]`` and the score is the sum of the continuation
tokens' log-probabilities (log-softmax in float32, summed in float64).

Per question: ``acc`` is 1 when the highest score is the label's (the first of equal scores wins, as numpy's
argmax), ``acc_norm`` the same for the scores divided by each choice's length in characters. Per task: their
means and ``n``; over tasks: the unweighted mean (each task counts once, as the paper's table averages).

Requests are sorted by length (longest first) and batched so that no batch's logits exceed ``logits_bytes``
(``batch * length * vocabulary * 4`` bytes), at most ``max_batch`` sequences; padding is on the right, which a
causal model cannot see from the earlier positions that are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from varprune.device import autocast
from varprune.errors import RunError
from varprune.tasks.text import logits_of

LOGITS_BYTES = 1 << 29  # 512 MiB of float32 logits per batch at most
MAX_BATCH = 64


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int | None):
    """``(context tokens, continuation tokens)`` as lm-eval's ``_encode_pair`` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        if prefix_id is None:
            raise RunError(
                "a question has an empty context, which is scored after a beginning-of-text token, and this "
                "tokenizer names none; give every question a context"
            )
        return [prefix_id], encode(continuation)
    whole = encode(context + continuation)
    n = len(encode(context))
    return whole[:n], whole[n:]


def _batches(lengths: Sequence[int], vocab: int, logits_bytes: int, max_batch: int) -> list[list[int]]:
    """Indices of the requests in batches, longest first, each batch's logits within ``logits_bytes``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_batch and (len(out[-1]) + 1) * lengths[out[-1][0]] * vocab * 4 <= logits_bytes:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _vocab(model, device: torch.device, first: list[int]) -> int:
    """The width of the model's logits: its configuration's vocabulary, else measured on one token."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return int(logits_of(model(torch.tensor([first[:1]], device=device))).shape[-1])


def loglikelihoods(
    model,
    requests: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    device: torch.device,
    amp: str = "none",
    logits_bytes: int = LOGITS_BYTES,
    max_batch: int = MAX_BATCH,
) -> list[float]:
    """The summed log-probability of each request's continuation tokens given its context tokens."""
    return scored(model, requests, max_length, device, amp, logits_bytes, max_batch, greedy=False)[0]


@torch.no_grad()
def scored(
    model,
    requests: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    device: torch.device,
    amp: str = "none",
    logits_bytes: int = LOGITS_BYTES,
    max_batch: int = MAX_BATCH,
    greedy: bool = True,
) -> tuple[list[float], list[bool]]:
    """:func:`loglikelihoods`, and whether each continuation is the model's greedy one (every token its argmax:
    lm-eval's ``is_greedy``; all False unless ``greedy``, which costs an argmax over the vocabulary)."""
    inputs, starts = [], []
    for ctx, cont in requests:
        if not cont:
            raise RunError("a choice encodes to no token; every choice needs at least one character")
        if len(cont) > max_length:
            raise RunError(
                f"a choice of {len(cont)} tokens exceeds the model's {max_length} positions; shorten the choices"
            )
        whole = (ctx + cont)[-(max_length + 1) :]
        inputs.append(whole)  # the model reads whole[:-1]; position p predicts whole[p + 1]
        starts.append(len(whole) - 1 - len(cont))  # the first position that predicts a continuation token
    was_training = model.training
    model.eval()
    parts, tops, order = [], [], []
    try:
        vocab = _vocab(model, device, inputs[0]) if inputs else 1
        for batch in _batches([len(x) - 1 for x in inputs], vocab, logits_bytes, max_batch):
            width = len(inputs[batch[0]]) - 1
            ids = torch.zeros(len(batch), width + 1, dtype=torch.long)
            rows: list[int] = []
            positions: list[int] = []  # the continuation's positions only: the context's logits are not scored
            for row, i in enumerate(batch):
                ids[row] = inputs[i][-1]  # padding a causal model never sees from the scored positions; not the
                ids[row, : len(inputs[i])] = torch.tensor(inputs[i])  # pad id, which transformers warns about
                rows += [row] * (len(inputs[i]) - 1 - starts[i])
                positions += range(starts[i], len(inputs[i]) - 1)
            ids = ids.to(device, non_blocking=True)
            at = torch.tensor(rows).to(device, non_blocking=True), torch.tensor(positions).to(device, non_blocking=True)
            with autocast(device, amp):
                logits = logits_of(model(ids[:, :-1]))
            chosen, target = logits[at].float(), ids[at[0], at[1] + 1]  # index tensors: no host synchronisation
            logp = F.log_softmax(chosen, -1).gather(-1, target[:, None])[:, 0].double()
            total = torch.zeros(len(batch), dtype=torch.float64, device=logp.device)
            parts.append(total.index_add_(0, at[0], logp))  # stays on the device: one transfer at the end
            if greedy:
                wrong = (chosen.argmax(-1) != target).float()
                tops.append(torch.zeros(len(batch), device=logp.device).index_add_(0, at[0], wrong) == 0)
            order.extend(batch)
            del logits, chosen, logp
        scores, best = [0.0] * len(requests), [False] * len(requests)
        if parts:
            for i, value in zip(order, torch.cat(parts).tolist()):
                scores[i] = value
        if tops:
            for i, top in zip(order, torch.cat(tops).tolist()):
                best[i] = bool(top)
    finally:
        model.train(was_training)
    return scores, best


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_accuracy(
    model,
    encode: Callable[[str], list[int]],
    sets: Sequence,
    max_length: int,
    device: torch.device,
    amp: str = "none",
    prefix_id: int | None = None,
    logits_bytes: int = LOGITS_BYTES,
) -> dict:
    """``{"tasks": {name: {"acc", "acc_norm", "n"}}, "mean": {"acc", "acc_norm"}}`` for ``sets`` (objects with
    ``name`` and ``items``, each item with ``requests()``, ``choices`` and ``label``: data/choices.py)."""
    requests, owners = [], []
    for s, task in enumerate(sets):
        for q, item in enumerate(task.items):
            for c, (context, continuation) in enumerate(item.requests()):
                pair = encode_pair(encode, context, continuation, prefix_id)
                if len(pair[1]) > max_length:
                    raise RunError(
                        f"{getattr(task, 'source', task.name)}: question {q + 1}, choice {c} is {len(pair[1])} tokens, "
                        f"more than the model's {max_length} positions; shorten it or leave the task out"
                    )
                requests.append(pair)
                owners.append((s, q, c))
    scores = loglikelihoods(model, requests, max_length, device, amp, logits_bytes)
    by_question: dict[tuple[int, int], dict[int, float]] = {}
    for (s, q, c), score in zip(owners, scores):
        by_question.setdefault((s, q), {})[c] = score
    tasks = {}
    for s, task in enumerate(sets):
        acc = norm = 0
        for q, item in enumerate(task.items):
            lls = [by_question[(s, q)][c] for c in range(len(item.choices))]
            acc += _first_argmax(lls) == item.label
            norm += _first_argmax([ll / len(ch) for ll, ch in zip(lls, item.choices)]) == item.label
        n = len(task.items)
        tasks[task.name] = {"acc": acc / n, "acc_norm": norm / n, "n": n}
    mean = {k: sum(t[k] for t in tasks.values()) / len(tasks) for k in ("acc", "acc_norm")} if tasks else {}
    return {"tasks": tasks, "mean": mean}
