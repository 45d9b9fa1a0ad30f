"""Fuzzing (issue 5): the configuration parser, the dataset readers and the
checkpoint readers, fed random, truncated and mutated input, either succeed or
raise the project's own error (DatasetError, CheckpointError, RunError,
UsageError: what the CLI prints as one line with exit code 2). Never another
exception, never a hang (every example has a deadline).
"""

import copy
import dataclasses
import gzip
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from varprune.cli import build_parser
from varprune.commands.flags import from_args
from varprune.data import DATASETS, DatasetError, DeviceLoader, load_dataset, parse_cifar_batch, parse_idx
from varprune.engine.checks import problems
from varprune.engine.config import TrainConfig
from varprune.engine.loop import _restore, _rng_state
from varprune.engine.loop import check_checkpoint as _check_checkpoint
from varprune.engine.runconfig import load_run_config
from varprune.errors import RunError, UsageError
from varprune.storage.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_weights, save_checkpoint


def validate_config(cfg, check_device=False):
    return problems(cfg, check_device=check_device)


FUZZ = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def truncations(raw: bytes):
    """``raw`` cut short, extended, or with one byte changed."""
    return st.one_of(
        st.integers(0, len(raw)).map(lambda n: raw[:n]),
        st.binary(min_size=1, max_size=16).map(lambda tail: raw + tail),
        st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)).map(
            lambda t: raw[: t[0]] + bytes([t[1]]) + raw[t[0] + 1 :]
        ),
    )


# ------------------------------------------------------------ configuration

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
field_values = {
    "int": st.integers(-5, 5) | st.integers(),
    "float": st.floats() | st.integers(-3, 3),
    "str": st.sampled_from(["mlp", "sgd", "var", "auto", "cpu", "cuda:7", "fashion-mnist", "cifar10", "", "x"])
    | st.text(max_size=8),
}


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(sorted(FIELDS)) | st.text(max_size=6),
        json_values | st.one_of(*field_values.values()),
        max_size=8,
    )
)
def test_config_from_dict_is_a_config_or_a_run_error(d):
    try:
        cfg = TrainConfig.from_dict(d)
    except RunError as e:
        assert "\n" not in str(e)
        return
    problems = validate_config(cfg, check_device=False)
    assert all(isinstance(p, str) and "\n" not in p for p in problems)


@FUZZ
@given(
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(sorted(FIELDS)), json_values, max_size=6).map(
        lambda d: json.dumps({"train": d}).encode()
    )
)
def test_run_config_file_is_a_config_or_a_run_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(raw)
        try:
            cfg = load_run_config(Path(tmp))
        except RunError as e:
            assert "\n" not in str(e)
        else:
            assert validate_config(cfg, check_device=False) == []


TOKENS = [
    "train",
    "prune",
    "study",
    "report",
    "demo",
    "doctor",
    "--out",
    "--resume",
    "--overwrite",
    "--quiet",
    "--epochs",
    "--batch-size",
    "--lr",
    "--var-lambda",
    "--var-r",
    "--var-eps",
    "--rho",
    "--seed",
    "--cram-sparsities",
    "--sparsities",
    "--methods",
    "--seeds",
    "--model",
    "--method",
    "--dataset",
    "--device",
    "--amp",
    "--limit-train",
    "--scope",
    "--bnt-batches",
    "--force",
    "--data-dir",
    "0",
    "-1",
    "1e-8",
    "nan",
    "inf",
    "-inf",
    "0.5,0.5",
    "0.5,1.0",
    "0.9",
    "mlp",
    "var",
    "cpu",
    "run",
    ",",
    "",
    "--",
    "=",
    "--epochs=3",
    "--lr=-1",
    "1" * 30,
]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS) | st.text(max_size=6).filter(lambda t: t not in ("-h", "--help")), max_size=10))
def test_command_line_parses_to_a_valid_config_or_a_usage_error(argv):
    assume("-h" not in argv and not any(t.startswith("--h") for t in argv))
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    if args.command in ("train", "study"):
        try:
            cfg = from_args(args, **({"method": "sgd", "seed": 0} if args.command == "study" else {}))
        except TypeError:
            pytest.fail(f"{argv} parsed but gave no TrainConfig")
        assert all("\n" not in p for p in problems(cfg, check_device=False))


# ------------------------------------------------------------ dataset readers


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


IDX = idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))


@FUZZ
@given(
    st.binary(max_size=64)
    | truncations(IDX)
    | st.tuples(st.integers(0, 255), st.lists(st.integers(0, 2**32 - 1), max_size=4), st.binary(max_size=32)).map(
        lambda t: bytes([0, 0, 8, t[0]]) + b"".join(struct.pack(">I", d) for d in t[1]) + t[2]
    )
)
def test_parse_idx_is_an_array_or_a_dataset_error(raw):
    try:
        array = parse_idx(raw, "fuzz")
    except DatasetError as e:
        assert "\n" not in str(e)
    else:
        assert array.dtype == np.uint8 and 1 <= array.ndim <= 3


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


CIFAR = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
pickles = st.recursive(
    st.none() | st.integers() | st.binary(max_size=8) | st.text(max_size=8) | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from([b"data", b"labels", "data"]) | st.binary(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
).map(lambda obj: pickle.dumps(obj, protocol=2))
arrays = st.tuples(
    st.integers(0, 3),
    st.sampled_from([3072, 3071, 1]),
    st.sampled_from(["u1", "f4", "i8", "O"]),
    st.lists(st.integers(-1, 300), max_size=5),
).map(lambda t: pickle.dumps({b"data": np.zeros((t[0], t[1]), t[2]), b"labels": t[3]}, protocol=2))


@FUZZ
@given(st.binary(max_size=128) | truncations(CIFAR) | pickles | arrays | st.just(pickle.dumps(Evil())))
def test_parse_cifar_batch_is_arrays_or_a_dataset_error(raw):
    try:
        x, y = parse_cifar_batch(raw, "fuzz", b"labels")
    except DatasetError as e:
        assert "\n" not in str(e)
    else:
        assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)


def test_cifar_reader_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(DatasetError, match="not a CIFAR python batch"):
        parse_cifar_batch(pickle.dumps({b"data": Payload(), b"labels": []}), "evil", b"labels")
    assert not marker.exists()


def fake_mnist(root: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(rng.integers(0, 10, n)))
    for name, raw in files.items():
        (root / name).write_bytes(raw)
    return files


@FEW
@given(
    st.sampled_from(
        [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ]
    ),
    st.data(),
)
def test_dataset_files_load_or_raise_a_dataset_error(name, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = fake_mnist(root)
        inner = gzip.decompress(files[name])
        raw = data.draw(
            st.one_of(truncations(files[name]), truncations(inner).map(gzip.compress), st.binary(max_size=64))
        )
        (root / name).write_bytes(raw)
        try:
            loaded = load_dataset("fashion-mnist", root)
        except DatasetError as e:
            assert "\n" not in str(e)
        else:
            assert loaded.train_x.shape[1:] == (1, 28, 28) and len(loaded.train_x) == len(loaded.train_y)


@FEW
@given(st.binary(max_size=128) | truncations(CIFAR) | arrays)
def test_cifar_files_load_or_raise_a_dataset_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifar-10-batches-py"
        folder.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(CIFAR)
        (folder / "data_batch_3").write_bytes(raw)
        try:
            load_dataset("cifar10", tmp)
        except DatasetError as e:
            assert "\n" not in str(e)


def test_every_dataset_reports_missing_files_as_a_dataset_error(tmp_path):
    for name in DATASETS:  # one line that names the folder it looked in
        with pytest.raises(DatasetError) as e:
            load_dataset(name, tmp_path)
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


# ------------------------------------------------------------ checkpoint readers


def tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False), torch.nn.BatchNorm1d(2))


def _checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        save_checkpoint(
            Path(tmp) / "c",
            {
                "epoch": 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "nested": {"t": (torch.ones(2), [1, 2.5, None]), 3: "x"},
            },
        )
        return (Path(tmp) / "c").read_bytes()


CKPT = _checkpoint_bytes()
WEIGHTS = st_save({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, metadata={"model": "tiny"})


def safetensors_with_state(state_text: str) -> bytes:
    return st_save({"s.a": torch.zeros(2)}, metadata={"format": FORMAT, "state": state_text})


@FUZZ
@given(
    st.binary(max_size=200)
    | truncations(CKPT)
    | json_values.map(lambda v: safetensors_with_state(json.dumps(v)))
    | st.text(max_size=40).map(safetensors_with_state)
)
def test_load_checkpoint_is_a_state_or_a_checkpoint_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.safetensors"
        path.write_bytes(raw)
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
        else:
            assert isinstance(state, dict)


@FUZZ
@given(
    st.binary(max_size=100)
    | truncations(WEIGHTS)
    | st.dictionaries(
        st.sampled_from(["0.weight", "1.weight", "1.bias", "1.running_mean", "x"]),
        st.sampled_from(
            [
                torch.zeros(2, 3),
                torch.zeros(2),
                torch.zeros(3, 2),
                torch.zeros(2, dtype=torch.int64),
                torch.zeros((), dtype=torch.bool),
                torch.zeros(2, dtype=torch.complex64),
            ]
        ),
        max_size=6,
    ).map(lambda d: st_save({k: v.clone() for k, v in d.items()}))
)
def test_load_weights_fits_or_raises_a_checkpoint_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        try:
            load_weights(path, tiny_model(), expect={"model": "tiny"})
        except CheckpointError as e:
            assert "\n" not in str(e)


def _training_state():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    loader = DeviceLoader(
        torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
        torch.zeros(4, dtype=torch.int64),
        DATASETS["fashion-mnist"],
        2,
        train=True,
    )
    return {
        "epoch": 1,
        "config": dataclasses.asdict(TrainConfig(model="mlp", epochs=3)),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": _rng_state(torch.device("cpu"), loader),
        "history": [{"epoch": 1, "loss": 1.0}],
    }


STATE = _training_state()


def training_state():
    """A valid training checkpoint of a tiny model, and what restoring it needs (all fresh)."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loader = DeviceLoader(
        torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
        torch.zeros(4, dtype=torch.int64),
        DATASETS["fashion-mnist"],
        2,
        train=True,
    )
    return copy.deepcopy(STATE), TrainConfig(model="mlp", epochs=3), model, opt, loader


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


replacements = json_values | st.sampled_from(
    [torch.zeros(2), torch.zeros(3, 2), torch.zeros(5, dtype=torch.uint8), torch.zeros((), dtype=torch.int64), {}, []]
)


@FUZZ
@given(st.data())
def test_restoring_a_mutated_checkpoint_is_fine_or_a_checkpoint_error(data):
    state, cfg, model, opt, loader = training_state()
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from([p for p in paths(state) if p]))
        parent = state
        for key in where[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[where[-1]] = data.draw(replacements)
        elif isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent.pop(where[-1])
    try:
        _check_checkpoint(state, cfg, Path("checkpoint.safetensors"))
        _restore(state, Path("checkpoint.safetensors"), model, opt, torch.device("cpu"), loader)
    except CheckpointError as e:
        assert "\n" not in str(e)


def test_a_valid_training_state_restores():
    state, cfg, _model, _opt, loader = training_state()
    _check_checkpoint(state, cfg, Path("c"))
    _restore(
        state,
        Path("c"),
        tiny_model(),
        torch.optim.SGD(tiny_model().parameters(), lr=0.1, momentum=0.9, nesterov=True),
        torch.device("cpu"),
        loader,
    )
    with pytest.raises(CheckpointError, match="belongs to another run"):
        _check_checkpoint(state, dataclasses.replace(cfg, model="resnet20"), Path("c"))
