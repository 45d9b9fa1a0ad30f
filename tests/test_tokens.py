"""The token loaders: windows of the stream, seeded and resumable, evaluation windows (the perplexity
protocol's input), global-batch sharding, padding and attention masks, calibration inputs, memory checks."""

import contextlib
from pathlib import Path

import pytest
import torch

from text_helpers import PIECES_SAMPLES, TRAIN_TEXT, WORDS, cls_corpus, llama3_style_tokenizer, lm_corpus, one_line
from varprune.data import text, tokens
from varprune.data.tokenizer import CLS_ID, train_tokenizer
from varprune.data.tokens import (
    EncodedExamples,
    TokenExampleLoader,
    TokenWindowLoader,
    calibration_inputs,
    text_loader,
    tokenize,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TRAIN_TEXT, 400)


# ----------------------------------------------------------------- language-modeling loaders


@pytest.mark.parametrize("size", [1, 17])
def test_stream_is_the_whole_text_encoded(tok, size):
    for encoder in (tok, llama3_style_tokenizer()):
        for sample in PIECES_SAMPLES:
            stream = tokens.encode_stream(encoder, sample, chunk_chars=size)
            assert stream.dtype == torch.int64 and stream.tolist() == encoder.encode(sample)


def windows_loader(n=1000, seq_len=16, batch=8, train=True, **kw):
    return TokenWindowLoader(torch.arange(n), seq_len, batch, train, **kw)


def batches(loader):
    return [x.clone() for x, _ in loader]


def test_training_windows_are_windows_of_the_stream():
    stream = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1))
    loader = TokenWindowLoader(stream, 12, 7, True, seed=3)
    seen = 0
    for x, y in loader:
        assert y is x and x.dtype == torch.int64 and x.shape[1] == 12
        for row in x:
            assert any(torch.equal(row, stream[s : s + 12]) for s in range(500 - 11)), row
        seen += len(x)
    assert seen == loader.num_examples == 500 // 12
    for x, _ in windows_loader(n=300, seq_len=10, seed=5):
        assert (x[:, 1:] - x[:, :-1] == 1).all() and x.min() >= 0 and x.max() < 300


def test_windows_cover_every_offset_not_only_multiples():
    starts = torch.cat([x[:, 0] for x, _ in windows_loader(n=2000, seq_len=16, num_windows=400, seed=0)])
    assert (starts % 16 != 0).any() and starts.min() >= 0 and starts.max() <= 2000 - 16
    counts = torch.bincount(starts * 4 // (2000 - 16 + 1), minlength=4)  # uniform over every valid start
    assert counts.min() > 60, counts


def test_same_seed_same_batches_and_restored_generator_resumes():
    a, b = windows_loader(seed=11), windows_loader(seed=11)
    assert all(torch.equal(x, y) for x, y in zip(batches(a), batches(b)))
    assert not all(torch.equal(x, y) for x, y in zip(batches(windows_loader(seed=12)), batches(windows_loader())))
    batches(a)  # epoch 1 done: a checkpoint saves the generator state here
    state = a.generator.get_state()
    epoch2 = batches(a)
    resumed = windows_loader(seed=999)
    resumed.generator.set_state(state)
    assert all(torch.equal(x, y) for x, y in zip(epoch2, batches(resumed)))


def test_evaluation_windows_are_the_stream_cut_in_order():
    n, seq_len = 1003, 10
    stream = torch.randint(0, 9, (n,), generator=torch.Generator().manual_seed(0))
    loader = TokenWindowLoader(stream, seq_len, 8, False)
    xs = batches(loader)
    assert loader.num_examples == n // seq_len == sum(len(x) for x in xs) and len(loader) == len(xs)
    # the perplexity protocol's input, checked independently: the visited windows are the stream's prefix
    assert torch.equal(torch.cat(xs).reshape(-1), stream[: (n // seq_len) * seq_len])
    limited = TokenWindowLoader(stream, seq_len, 8, False, num_windows=13)
    assert torch.equal(torch.cat(batches(limited)), torch.cat(xs)[:13])
    assert TokenWindowLoader(stream, seq_len, 8, False, num_windows=10**6).num_examples == n // seq_len
    assert loader.tokens_per_window == seq_len - 1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_window_shards_concatenate_to_the_one_process_batch(world, train):
    whole = batches(windows_loader(n=1000, seq_len=16, batch=8, train=train, seed=4))
    shards = [batches(windows_loader(1000, 16, 8, train, seed=4, rank=r, world=world)) for r in range(world)]
    if train:  # every step: the ranks' shares, in rank order, are the global batch
        assert all(len(s) == len(whole) for s in shards)
        for step, batch in enumerate(whole):
            assert torch.equal(torch.cat([s[step] for s in shards]), batch)
            sizes = [len(s[step]) for s in shards]
            assert max(sizes) - min(sizes) <= 1
    else:  # evaluation: contiguous shares of the windows
        assert torch.equal(torch.cat([torch.cat(s) for s in shards]), torch.cat(whole))


@pytest.mark.parametrize(("n_windows", "batch", "world"), [(62, 8, 1), (61, 8, 1), (57, 8, 1), (65, 8, 3), (5, 8, 2)])
def test_len_matches_iteration_and_loss_weights(n_windows, batch, world):
    for train in (True, False):
        one = batches(windows_loader(2000, 16, batch, train, num_windows=n_windows))
        assert sum(len(x) for x in one) == (n_windows if not train or n_windows % batch != 1 else n_windows - 1)
        for rank in range(world):
            loader = windows_loader(2000, 16, batch, train, num_windows=n_windows, rank=rank, world=world)
            xs = batches(loader)
            assert len(loader) == len(xs) and all(len(x) >= (2 if train else 1) for x in xs)
            if train:  # the shares' mean gradients, weighted, average to the global batch's mean
                assert len(xs) == len(one)
                for step, x in enumerate(xs):
                    assert loader.loss_weight(step) == pytest.approx(len(x) * world / len(one[step]))


def test_stream_shorter_than_one_window_names_file_and_sizes(tmp_path, tok):
    corpus = lm_corpus(tmp_path, test="tiny\n")
    data = tokenize(corpus, tok)
    message = one_line(text_loader, data, "test", 4, False, seq_len=64)
    assert str(tmp_path / "test.txt") in message and f"{len(data.streams['test'])} tokens" in message
    assert "seq_len 64" in message
    assert "seq_len" in one_line(TokenWindowLoader, torch.arange(10), 1, 4, True)


def test_tokenize_language_modeling(tmp_path, tok):
    corpus = lm_corpus(tmp_path, valid=WORDS)
    data = tokenize(corpus, tok)
    assert set(data.streams) == {"train", "valid", "test"} and not data.examples
    for split, s in corpus.splits.items():
        stream = data.streams[split]
        assert stream.dtype == torch.int64 and stream.dim() == 1 and stream.tolist() == tok.encode(s.text)
    assert data.vocab_size == tok.vocab_size and data.pad_id == 0 and data.task == "language-modeling"
    loader = text_loader(data, "train", 4, True, seq_len=8, limit=10)
    assert loader.num_examples == 10 and len(loader) == 3


def test_memory_is_estimated_before_allocating(tok):
    huge = 2**60
    assert "may need" in one_line(tokens.encode_stream, tok, "abc", num_bytes=huge)
    assert "memory" in one_line(tokens.encode_examples, tok, ["abc"], [0], max_length=huge)


# ----------------------------------------------------------------- classification loaders


def test_classification_padding_and_attention_masks(tmp_path, tok):
    corpus = cls_corpus(tmp_path)
    data = tokenize(corpus, tok, max_length=12)
    ex = data.examples["train"]
    assert ex.input_ids.shape == (30, 12) and ex.input_ids.dtype == torch.int64
    assert ex.labels.tolist() == corpus.splits["train"].labels
    loader = text_loader(data, "train", 7, True, seed=1)
    seen = []
    for x, y in loader:
        ids, mask = x["input_ids"], x["attention_mask"]
        assert ids.shape == mask.shape and mask.dtype == torch.int64 and y.dtype == torch.int64
        assert (ids[:, 0] == CLS_ID).all() and (ids[mask == 0] == tok.pad_id).all()
        assert (mask[:, :-1] >= mask[:, 1:]).all()  # ones, then zeros
        for row, m, label in zip(ids, mask, y):
            i = next(k for k in range(30) if torch.equal(ex.input_ids[k], row) and ex.labels[k] == label)
            words = corpus.splits["train"].texts[i]
            want = tok.encode_examples([words], 12)[0]
            assert row[: int(m.sum())].tolist() == want and len(want) == min(12, 1 + len(tok.encode(words)))
            seen.append(i)
    assert sorted(seen) == list(range(30)) and len(loader) == 5  # a last batch of 30 % 7 = 2 is kept
    assert len(text_loader(data, "train", 29, True)) == 1  # ... one of 30 % 29 = 1 is dropped (as DeviceLoader)
    assert len(text_loader(data, "test", 7, False)) == 5


@pytest.mark.parametrize("world", [2, 3])
def test_classification_shards_concatenate_to_the_one_process_batch(tmp_path, tok, world):
    data = tokenize(cls_corpus(tmp_path, n=50), tok, max_length=8)
    whole = [(x["input_ids"], y) for x, y in text_loader(data, "train", 9, True, seed=2)]
    shards = [
        [(x["input_ids"], y) for x, y in text_loader(data, "train", 9, True, 2, rank=r, world=world)]
        for r in range(world)
    ]
    assert all(len(s) == len(shards[0]) for s in shards)
    last = 50 % 9  # a last global batch leaving some process fewer than 2 examples is dropped (as DeviceLoader)
    assert len(whole) - len(shards[0]) == (1 if last < 2 * world else 0)
    for step, (ids, y) in enumerate(whole[: len(shards[0])]):
        assert torch.equal(torch.cat([s[step][0] for s in shards]), ids)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)


def test_classification_generator_resumes(tmp_path, tok):
    data = tokenize(cls_corpus(tmp_path), tok, max_length=8)
    a = text_loader(data, "train", 8, True, seed=5)
    list(a)
    state = a.generator.get_state()
    epoch2 = [y for _, y in a]
    b = text_loader(data, "train", 8, True, seed=0)
    b.generator.set_state(state)
    assert all(torch.equal(u, v) for u, v in zip(epoch2, [y for _, y in b]))


# ----------------------------------------------------------------- calibration


def test_calibration_windows_come_from_train_and_are_seeded(tmp_path, tok):
    corpus = lm_corpus(tmp_path)
    data = tokenize(corpus, tok)
    data.streams["test"] = data.streams["test"] + 10_000  # test ids that no training window can hold
    data.streams["train"] = torch.arange(len(data.streams["train"]))
    inputs = calibration_inputs(data, 6, seq_len=16)
    assert len(inputs) == 6 and all(x.shape == (1, 16) and x.dtype == torch.int64 for x in inputs)
    for x in inputs:
        assert x.max() < 10_000 and (x[0, 1:] - x[0, :-1] == 1).all()
    again = calibration_inputs(data, 6, seq_len=16)
    assert all(torch.equal(x, y) for x, y in zip(inputs, again))
    other = calibration_inputs(data, 6, seq_len=16, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(inputs, other))


def test_calibration_examples_come_from_train(tmp_path, tok):
    data = tokenize(cls_corpus(tmp_path), tok, max_length=10)
    train = data.examples["train"]
    data.examples["test"] = EncodedExamples(train.input_ids * 0 + 7, train.lengths, train.labels)
    inputs = calibration_inputs(data, 5)
    assert len(inputs) == 5
    rows = []
    for x in inputs:
        assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (1, 10)
        rows.append(next(i for i in range(len(train)) if torch.equal(train.input_ids[i], x["input_ids"][0])))
        assert torch.equal(x["attention_mask"], train.attention_mask(slice(rows[-1], rows[-1] + 1)))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(inputs, calibration_inputs(data, 5)))
    assert len(set(rows)) == 5  # distinct examples
    assert "calibration examples" in one_line(calibration_inputs, data, 31)


def test_example_loader_needs_examples():
    empty = EncodedExamples(*(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long)), torch.zeros(0))
    assert "no examples" in one_line(TokenExampleLoader, empty, 4, True)


@pytest.mark.skipif(not Path(text.DEBIAN_FORTUNES, "goedel").is_file(), reason="apt-get install fortunes")
def test_fortunes_end_to_end():
    corpus = text.load("fortunes-topics", Path(text.DEBIAN_FORTUNES))
    small = train_tokenizer(corpus.splits["train"].texts[:300], 300)
    data = tokenize(corpus, small, max_length=16)
    x, y = next(iter(text_loader(data, "train", 32, True)))
    assert x["input_ids"].shape == (32, 16) and int(y.max()) < corpus.info.num_classes


@contextlib.contextmanager
def count_host_reads():
    """Count reads of tensor values into Python (each one a host synchronisation on a GPU)."""
    counts = {"n": 0}
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counted(fn):
        def read(self, *a, **k):
            counts["n"] += 1
            return fn(self, *a, **k)

        return read

    for name, fn in saved.items():
        setattr(torch.Tensor, name, counted(fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_iterating_the_loaders_reads_nothing_back_to_the_host(tmp_path, tok):
    data = tokenize(cls_corpus(tmp_path), tok, max_length=8)
    loaders = [windows_loader(train=True, world=2, rank=1), windows_loader(train=False, world=3, rank=2)]
    loaders += [text_loader(data, "train", 7, True, rank=1, world=2), text_loader(data, "test", 7, False)]
    for loader in loaders:
        with count_host_reads() as reads:
            n = sum(1 for _ in loader) + sum(1 for _ in loader)
        assert n == 2 * len(loader) > 0 and reads["n"] == 0, (type(loader).__name__, reads)
