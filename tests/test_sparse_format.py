"""Pruned-model files: bit-exact round trips, deterministic bytes, every damage detected, the size bound."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from torch import nn

from varprune import MagnitudePruner, create_model, prunable_weights, realised_sparsity
from varprune.storage.checkpoint import save_weights
from varprune.storage.pruned_format import (
    MASKS_KEY,
    VALUES_KEY,
    PrunedFormatError,
    _serialize,
    load_pruned,
    pack_bits,
    read_pruned_metadata,
    save_pruned,
    unpack_bits,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
ARGS = {"in_channels": 1, "num_classes": 10, "image_size": 28}


def trained_looking(name: str, seed: int = 0) -> nn.Module:
    """A registry model with non-default BN statistics (so "stored as is" is tested on real values)."""
    torch.manual_seed(seed)
    model = create_model(name, **ARGS)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(1234)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def random_masks(model: nn.Module, keep: float, seed: int = 1, negative_zero: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, p in prunable_weights(model):
            m = torch.rand(p.shape, generator=g) < keep
            if negative_zero:
                p.mul_(m)  # leaves -0.0 where a negative weight was pruned
            else:
                p.masked_fill_(~m, 0.0)
            masks[name] = m
    return masks


def meta_for(name: str) -> dict:
    return {"model": name, "model_args": ARGS, "dataset": {"shape": [1, 28, 28], "classes": 10}, "pattern": "random"}


def rewrite(src: Path, dst: Path, edit) -> None:
    """Re-serialize a file after ``edit(meta, tensors)`` with a FRESH checksum: a consistent liar."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = dict(json.loads(raw[8 : 8 + n])["__metadata__"])
    tensors = st_load(raw)
    edit(meta, tensors)
    dst.write_bytes(_serialize(tensors, meta))


# ---------------------------------------------------------------------------- bits


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000])
def test_pack_bits_matches_numpy_little_bit_order(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy(), bitorder="little"))
    assert torch.equal(unpack_bits(packed, n), bits)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name,negative_zero", [("resnet20", False), ("mlp", True)])
def test_fp32_round_trip_is_bit_exact(tmp_path, name, negative_zero):
    model = trained_looking(name)
    masks = random_masks(model, keep=0.07, negative_zero=negative_zero)
    save_pruned(tmp_path / "m.safetensors", model, masks, meta_for(name))
    loaded = load_pruned(tmp_path / "m.safetensors")
    assert not loaded.training
    want, got = model.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        if key in masks:
            m = masks[key]
            assert torch.equal(got[key][m].view(torch.int32), want[key][m].view(torch.int32)), key  # bitwise
            assert torch.equal(got[key][~m].view(torch.int32), torch.zeros(int((~m).sum()), dtype=torch.int32))
        else:
            assert torch.equal(got[key], want[key]), key
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name", ["resnet20", "mlp"])
@pytest.mark.parametrize("values,dtype,rel", [("fp16", torch.float16, 2.0**-11), ("bf16", torch.bfloat16, 2.0**-8)])
def test_half_values_round_within_their_precision(tmp_path, name, values, dtype, rel):
    model = trained_looking(name)
    masks = random_masks(model, keep=0.1)
    save_pruned(tmp_path / "m.safetensors", model, masks, meta_for(name), values=values)
    assert read_pruned_metadata(tmp_path / "m.safetensors")["values_dtype"] == values
    got = load_pruned(tmp_path / "m.safetensors").state_dict()
    for key, w in model.state_dict().items():
        if key not in masks:
            assert torch.equal(got[key], w), key
            continue
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], w.to(dtype).to(torch.float32)), key  # torch's own rounding
        err = (got[key].double() - w.double()).abs()
        # round to nearest: half a unit in the last place, plus fp16's subnormal spacing near zero
        bound = w.double().abs() * rel + (2.0**-25 if dtype == torch.float16 else 0.0)
        assert bool((err <= bound).all()), key
        assert bool((got[key][~masks[key]] == 0).all())


def test_build_callable_and_metadata(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    masks = random_masks(net, keep=0.5)
    save_pruned(tmp_path / "m.safetensors", net, masks, {"pattern": "2:4", "note": {"b": 1, "a": [1.5]}})
    meta = read_pruned_metadata(tmp_path / "m.safetensors")
    assert meta["format"] == "varprune-pruned" and meta["format_version"] == 1
    assert meta["pattern"] == "2:4" and meta["note"] == '{"a":[1.5],"b":1}'
    assert meta["realised_sparsity"] == realised_sparsity(masks)
    assert [e[0] for e in meta["layout"]] == list(masks)
    assert [e[2] for e in meta["layout"]] == [int(m.sum()) for m in masks.values()]
    with pytest.raises(PrunedFormatError, match="does not name its model"):
        load_pruned(tmp_path / "m.safetensors")
    loaded = load_pruned(
        tmp_path / "m.safetensors", build=lambda: nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    )
    for key, w in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], w)
    # a plain safetensors reader sees the same file
    plain = load_file(tmp_path / "m.safetensors")
    assert set(plain) == {
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "2.bias",
        MASKS_KEY,
        VALUES_KEY,
    }


def test_registry_metadata_is_decoded(tmp_path):
    model = trained_looking("resnet20")
    masks = MagnitudePruner(model).apply(0.9)
    save_pruned(tmp_path / "m.safetensors", model, masks, meta_for("resnet20"))
    meta = read_pruned_metadata(tmp_path / "m.safetensors")
    assert meta["model"] == "resnet20" and meta["model_args"] == ARGS
    assert meta["dataset"] == {"shape": [1, 28, 28], "classes": 10}
    n = sum(p.numel() for _, p in prunable_weights(model))
    assert meta["realised_sparsity"] == pytest.approx(round(0.9 * n) / n, abs=1e-15)


# ---------------------------------------------------------------------------- determinism


def test_repeated_saves_are_byte_identical_even_across_processes(tmp_path):
    model = trained_looking("resnet20", seed=3)
    masks = random_masks(model, keep=0.05)
    save_pruned(tmp_path / "a.safetensors", model, masks, meta_for("resnet20"), values="fp16")
    save_pruned(tmp_path / "b.safetensors", model, masks, meta_for("resnet20"), values="fp16")
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    # a fresh interpreter (its own hash seed) writes the same bytes
    torch.save({"state": model.state_dict(), "masks": masks}, tmp_path / "in.pt")  # test fixture only
    code = (
        f"import torch, sys; sys.path.insert(0, {SRC!r})\n"
        "from varprune import create_model\nfrom varprune.storage.pruned_format import save_pruned\n"
        f"d = torch.load({str(tmp_path / 'in.pt')!r}, weights_only=True)\n"
        f"m = create_model('resnet20', **{ARGS!r}); m.load_state_dict(d['state'])\n"
        f"save_pruned({str(tmp_path / 'c.safetensors')!r}, m, d['masks'], {meta_for('resnet20')!r}, "
        "values='fp16')\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "c.safetensors").read_bytes() == a


# ---------------------------------------------------------------------------- damage


def tiny_file(tmp_path):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3, bias=False))

    net = build()
    masks = random_masks(net, keep=0.5)
    path = tmp_path / "tiny.safetensors"
    save_pruned(path, net, masks, {"pattern": "random"})
    return path, build


def test_every_flipped_byte_is_detected(tmp_path):
    path, build = tiny_file(tmp_path)
    raw = path.read_bytes()
    load_pruned(path, build=build)  # intact: loads
    bad = tmp_path / "bad.safetensors"
    undetected = []
    for i in range(len(raw)):
        damaged = bytearray(raw)
        damaged[i] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        try:
            load_pruned(bad, build=build)
            undetected.append(i)
        except PrunedFormatError as e:
            msg = str(e)
            assert "\n" not in msg and str(bad) in msg
    assert not undetected, f"flips at bytes {undetected[:10]} of {len(raw)} went unnoticed"


def test_flipped_payload_bytes_of_a_real_model_are_detected(tmp_path):
    model = trained_looking("resnet20")
    save_pruned(tmp_path / "m.safetensors", model, MagnitudePruner(model).apply(0.95), meta_for("resnet20"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    for i in np.linspace(0, len(raw) - 1, 40).astype(int):
        damaged = bytearray(raw)
        damaged[i] ^= 0x01  # a single bit
        (tmp_path / "bad.safetensors").write_bytes(bytes(damaged))
        with pytest.raises(PrunedFormatError):
            load_pruned(tmp_path / "bad.safetensors")


def test_truncated_files_are_rejected(tmp_path):
    path, build = tiny_file(tmp_path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    for cut in sorted({0, 3, 8, 8 + n // 2, 8 + n, 8 + n + 3, len(raw) - 1}):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(PrunedFormatError, match="cut.safetensors"):
            load_pruned(tmp_path / "cut.safetensors", build=build)
        if cut < 8 + n:
            with pytest.raises(PrunedFormatError):
                read_pruned_metadata(tmp_path / "cut.safetensors")


def test_foreign_and_missing_files_are_rejected(tmp_path):
    model = create_model("resnet20", **ARGS)
    save_weights(tmp_path / "dense.safetensors", model, {"model": "resnet20"})
    with pytest.raises(PrunedFormatError, match="not a varprune pruned-model file"):
        load_pruned(tmp_path / "dense.safetensors")
    with pytest.raises(PrunedFormatError, match="not a varprune pruned-model file"):
        read_pruned_metadata(tmp_path / "dense.safetensors")
    save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")  # no metadata at all
    with pytest.raises(PrunedFormatError, match="not a varprune pruned-model file"):
        load_pruned(tmp_path / "other.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, this is not a model\n" * 4)
    with pytest.raises(PrunedFormatError, match="text.safetensors"):
        load_pruned(tmp_path / "text.safetensors")
    with pytest.raises(PrunedFormatError, match="cannot read"):
        load_pruned(tmp_path / "absent.safetensors")


def lie_about(tmp_path, edit):
    model = trained_looking("resnet20")
    save_pruned(tmp_path / "m.safetensors", model, MagnitudePruner(model).apply(0.9), meta_for("resnet20"))
    rewrite(tmp_path / "m.safetensors", tmp_path / "lie.safetensors", edit)
    return tmp_path / "lie.safetensors"


def edit_layout(change):
    def edit(meta, tensors):
        layout = json.loads(meta["layout"])
        change(layout)
        meta["layout"] = json.dumps(layout)

    return edit


def test_consistent_liars_are_caught(tmp_path):
    def more_kept(layout):
        layout[0][2] += 1

    def bigger_shape(layout):
        layout[0][1][0] *= 2

    def moved_kept(layout):
        layout[0][2] += 1
        layout[1][2] -= 1

    def reshaped(layout):
        layout[1][1] = [layout[1][1][0], layout[1][1][1], 9]  # same numel, not the model's shape

    cases = [
        (more_kept, "keeps .* values"),
        (bigger_shape, "mask bits need"),
        (moved_kept, "mask bits set"),
        (reshaped, "shape mismatch"),
    ]
    for change, message in cases:
        path = lie_about(tmp_path, edit_layout(change))
        with pytest.raises(PrunedFormatError, match=message):
            load_pruned(path)

    def version_3(meta, tensors):
        meta["format_version"] = "3"

    with pytest.raises(PrunedFormatError, match="version '3'"):
        load_pruned(lie_about(tmp_path, version_3))

    def tied_to_nothing(meta, tensors):
        meta["format_version"] = "2"
        meta["tied"] = json.dumps({"extra.weight": "no.such.tensor"})

    with pytest.raises(PrunedFormatError, match="tied entry 'extra.weight' and its twin 'no.such.tensor' do not fit"):
        load_pruned(lie_about(tmp_path, tied_to_nothing))

    def tied_in_version_1(meta, tensors):
        meta["tied"] = json.dumps({"extra.weight": "no.such.tensor"})

    with pytest.raises(PrunedFormatError, match="'tied' is malformed"):
        load_pruned(lie_about(tmp_path, tied_in_version_1))

    def other_classes(meta, tensors):
        meta["model_args"] = json.dumps({**ARGS, "num_classes": 100})

    with pytest.raises(PrunedFormatError, match="does not fit"):
        load_pruned(lie_about(tmp_path, other_classes))


def test_set_spare_mask_bits_are_caught(tmp_path):
    def build():
        return nn.Sequential(nn.Linear(5, 3))  # 15 mask bits: the stream ends inside a byte

    torch.manual_seed(0)
    net = build()
    save_pruned(tmp_path / "m.safetensors", net, random_masks(net, keep=0.5), {})

    def spare_bit(meta, tensors):
        tensors[MASKS_KEY][-1] |= 0x80

    rewrite(tmp_path / "m.safetensors", tmp_path / "lie.safetensors", spare_bit)
    with pytest.raises(PrunedFormatError, match="spare mask bits"):
        load_pruned(tmp_path / "lie.safetensors", build=build)


def test_a_huge_lying_model_is_refused_before_allocation(tmp_path):
    # mlp at image_size 10^5 would hold 10^13 weights: the meta-device check must refuse it unallocated
    def huge(meta, tensors):
        meta["model"] = "mlp"
        meta["model_args"] = json.dumps({**ARGS, "image_size": 100_000})

    with pytest.raises(PrunedFormatError, match="does not fit"):
        load_pruned(lie_about(tmp_path, huge))


# ---------------------------------------------------------------------------- save errors


def test_save_refuses_what_it_cannot_store_faithfully(tmp_path):
    model = trained_looking("mlp")
    masks = random_masks(model, keep=0.2)
    out = tmp_path / "m.safetensors"
    name = next(iter(masks))
    with pytest.raises(ValueError, match="bool"):
        save_pruned(out, model, {name: masks[name].float()}, {})
    with pytest.raises(ValueError, match="shape"):
        save_pruned(out, model, {name: masks[name][:1]}, {})
    with pytest.raises(ValueError, match="names no entry"):
        save_pruned(out, model, {"nope.weight": masks[name]}, {})
    with pytest.raises(ValueError, match="non-zero weights"):
        save_pruned(out, model, {name: ~masks[name]}, {})
    with pytest.raises(ValueError, match="written by save_pruned"):
        save_pruned(out, model, masks, {"sha256": "x"})
    with pytest.raises(ValueError, match="model_args"):
        save_pruned(out, model, masks, {"model": "mlp", "model_args": '{"in_channels": 1}'})
    with pytest.raises(ValueError, match="values must be"):
        save_pruned(out, model, masks, {}, values="int8")
    with torch.no_grad():
        model.state_dict()[name].masked_fill_(masks[name], 1e5)
    with pytest.raises(ValueError, match="float16's range"):
        save_pruned(out, model, masks, {}, values="fp16")
    save_pruned(out, model, masks, {}, values="bf16")  # bf16 has the range
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------- size


def test_resnet18_at_95_percent_is_small(tmp_path):
    model = create_model("resnet18", 1, 10, 28)
    save_weights(tmp_path / "dense.safetensors", model, {})
    dense = os.path.getsize(tmp_path / "dense.safetensors")
    masks = random_masks(model, keep=0.05)  # the size depends on the count kept, not on which
    for values, factor in (("fp32", 8), ("fp16", 14)):
        save_pruned(
            tmp_path / f"{values}.safetensors", model, masks, {"model": "resnet18", "model_args": ARGS}, values=values
        )
        size = os.path.getsize(tmp_path / f"{values}.safetensors")
        assert size * factor <= dense, f"{values}: {size} bytes, dense {dense} (ratio {dense / size:.1f})"
