"""A pruned model in one compressed safetensors file: bit masks + kept values.

Layout of a ``.safetensors`` file written by `save_pruned` (format
``varprune-pruned``, version 1, or 2 where tied weights are stored once)::

    varprune.pruned_masks   uint8 [ceil(N / 8)]   the keep-masks of every pruned
                                                  tensor, flattened and concatenated
                                                  in ``layout`` order, 8 bits a byte,
                                                  little bit order (bit i of byte k is
                                                  element 8k + i; numpy.packbits with
                                                  bitorder="little"); spare bits 0
    varprune.pruned_values  F32|F16|BF16 [K]      the kept values, same order (row-major
                                                  within a tensor)
    <every other state_dict entry>                as is (biases, norms, BN running
                                                  statistics, num_batches_tracked),
                                                  a tied entry once (version 2)

One mask tensor and one value tensor for the whole model rather than two per
layer: each safetensors entry costs ~90 header bytes, which on a small model at
high sparsity outweighs the layer's payload. String metadata (keys sorted, so
two saves of the same model are byte-identical):

    format          "varprune-pruned"
    format_version  "1", or "2" when ``tied`` is there (an older reader then
                    says to upgrade instead of missing a tensor)
    tied            (version 2) JSON {name: twin}: dense entries that are the
                    same tensor as ``twin`` in the model (a language model's
                    lm_head.weight tied to its token embedding), left out and
                    filled from ``twin`` on load
    layout          JSON [[name, shape, kept], ...]: the pruned tensors, in stream order
    values_dtype    "fp32" | "fp16" | "bf16"
    realised_sparsity  JSON float: pruned / total over the pruned tensors
    sha256          hex digest of the canonical metadata (all other keys), the
                    tensor table (name, dtype, shape, offsets) and the data
                    section: any changed byte of meaning is detected
    model, model_args, dataset, pattern, ... whatever the caller passed
                    (model_args and dataset as JSON; other keys: strings as
                    given, everything else as JSON with sorted keys)

Nothing is pickled. The file is readable by any safetensors reader; the
writer is our own (checkpoint.serialize_safetensors, shared with run
checkpoints and weights) because ``safetensors.torch.save`` orders metadata
keys at random, which would break byte-identical saves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from varprune.storage.checkpoint import (
    _digest,
    _first_line,
    _table,
    atomic_write_bytes,
    non_finite,
    state_mismatch,
    tied_entries,
)
from varprune.storage.checkpoint import serialize_safetensors as _serialize

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MASKS_KEY",
    "VALUES_KEY",
    "VALUE_DTYPES",
    "PrunedFormatError",
    "load_pruned",
    "pack_bits",
    "read_pruned_metadata",
    "save_pruned",
    "unpack_bits",
]

FORMAT = "varprune-pruned"
FORMAT_VERSION = 1  # what a file without tied entries is written as
TIED_VERSION = 2  # a file that stores tied entries once
READ_VERSIONS = (1, 2)
TIED_KEY = "tied"
MASKS_KEY = "varprune.pruned_masks"
VALUES_KEY = "varprune.pruned_values"
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_RESERVED_META = ("format", "format_version", "layout", "values_dtype", "realised_sparsity", "sha256", TIED_KEY)
_JSON_META = ("format_version", "layout", "realised_sparsity", "model_args", "dataset", TIED_KEY)


class PrunedFormatError(ValueError):
    """A pruned-model file is missing, truncated, damaged, foreign or inconsistent."""


# ---------------------------------------------------------------------------- bits


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened) into uint8, 8 per byte, little bit order, spare bits 0."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first ``n`` bits of ``packed`` as a flat bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


# ---------------------------------------------------------------------------- file writing


def _encode_meta(value: Any, key: str) -> str:
    if isinstance(value, str) and key not in _JSON_META:
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"metadata {key!r} is not JSON-able ({_first_line(e)}); pass strings, numbers, lists or dicts"
        ) from None


# ---------------------------------------------------------------------------- save


def save_pruned(
    path: str | os.PathLike,
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    values: str = "fp32",
) -> None:
    """Write ``model`` with its keep-masks as one compressed safetensors file, atomically.

    ``masks`` maps state_dict names (``"layers.0.0.conv1.weight"``) to boolean
    tensors of the same shape, True = kept; the model's weights must already
    be zero where the mask is False (prune first, e.g.
    ``MagnitudePruner.apply``). Each pruned tensor is stored as its bits in one
    shared packed mask and its kept values, cast to ``values`` ("fp32",
    "fp16" or "bf16"); every other state entry is stored as is.

    ``metadata`` is the caller's description. For [`load_pruned`][varprune.storage.pruned_format.load_pruned] to
    rebuild the model without a ``build`` callable it must hold ``"model"``
    (a registry name) and ``"model_args"`` (a dict of keyword arguments of
    ``create_model``: in_channels, num_classes, image_size); ``"dataset"``
    (JSON-able) and ``"pattern"`` (str) are recommended. model_args and
    dataset are always stored as JSON; other keys: strings as given, other
    values as JSON. The keys format, format_version, layout,
    values_dtype, realised_sparsity and sha256 are written by this function.

    Two saves of the same state, masks and metadata are byte-identical.
    Raises ValueError for masks that do not fit the model, a non-zero weight
    at a pruned position, or kept values outside the float16 range with
    ``values="fp16"``.
    """
    if values not in VALUE_DTYPES:
        raise ValueError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise ValueError("metadata must be a dict with string keys")
    clash = sorted(set(metadata) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"metadata key(s) {', '.join(clash)} are written by save_pruned; remove them")
    if "model_args" in metadata and not isinstance(metadata["model_args"], dict):
        raise ValueError(
            f"metadata 'model_args' must be a dict of create_model keyword arguments, "
            f"got {type(metadata['model_args']).__name__}"
        )
    if "model" in metadata and not isinstance(metadata["model"], str):
        raise ValueError(f"metadata 'model' must be a registry name (str), got {type(metadata['model']).__name__}")
    if not masks:
        raise ValueError(
            "no masks given: a pruned-model file needs at least one pruned tensor "
            "(use checkpoint.save_weights for a dense model)"
        )
    state = model.state_dict()
    for key in (MASKS_KEY, VALUES_KEY):
        if key in state:
            raise ValueError(f"the model has a state entry named {key!r}, which this format reserves")
    vdtype = VALUE_DTYPES[values]
    layout, mask_parts, value_parts = [], [], []
    total = kept_total = 0
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(
                f"mask {name!r} names no entry of the model's state_dict "
                f"(e.g. {next(iter(state), '?')!r}): masks are keyed by parameter name"
            )
        w = state[name].detach()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask {name!r} must be a bool tensor (True = kept), got {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.shape != w.shape:
            raise ValueError(f"mask {name!r} has shape {list(mask.shape)}, the weight {list(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"cannot prune {name!r}: it is not a floating-point tensor ({w.dtype})")
        flat_w = w.reshape(-1).cpu()
        flat_m = mask.reshape(-1).cpu()
        if bool((flat_w[~flat_m] != 0).any()):
            raise ValueError(
                f"{name!r} has non-zero weights where its mask is False: apply the masks "
                f"before saving (MagnitudePruner.apply or MaskKeeper.apply_)"
            )
        kept = flat_w[flat_m]
        if vdtype is torch.float16:
            big = kept[torch.isfinite(kept)].abs()
            if big.numel() and float(big.max()) > torch.finfo(torch.float16).max:
                raise ValueError(
                    f"{name!r} keeps weights up to {float(big.max()):.4g}, beyond float16's "
                    f"range: save with values='bf16' or 'fp32'"
                )
        layout.append([name, list(w.shape), int(kept.numel())])
        mask_parts.append(flat_m)
        value_parts.append(kept.to(vdtype))
        total += flat_m.numel()
        kept_total += kept.numel()
    # a dense entry tied to another (lm_head.weight to the token embedding) is stored once
    tied = {k: twin for k, twin in tied_entries(state).items() if k not in masks and twin not in masks}
    tensors = {k: v.detach().cpu().clone() for k, v in state.items() if k not in masks and k not in tied}
    tensors[MASKS_KEY] = pack_bits(torch.cat(mask_parts))
    tensors[VALUES_KEY] = torch.cat(value_parts)
    meta = {k: _encode_meta(v, k) for k, v in metadata.items()}
    meta.update(
        {
            "format": FORMAT,
            "format_version": str(TIED_VERSION if tied else FORMAT_VERSION),
            "layout": json.dumps(layout, separators=(",", ":")),
            "values_dtype": values,
            "realised_sparsity": json.dumps(1.0 - kept_total / total if total else 0.0),
        }
    )
    if tied:
        meta[TIED_KEY] = json.dumps(tied, sort_keys=True, separators=(",", ":"))
    atomic_write_bytes(path, _serialize(tensors, meta))


# ---------------------------------------------------------------------------- read


def _read_header(path: Path, raw: bytes | None = None) -> tuple[dict, int]:
    """The parsed JSON header and the data section's start; PrunedFormatError if unreadable."""
    try:
        if raw is None:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < n <= size - 8:
                    raise PrunedFormatError(
                        f"{path} is not a safetensors file (header length {n} for "
                        f"{size} bytes); it may be truncated: export it again"
                    )
                text = f.read(n)
        else:
            n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
            if not 0 < n <= len(raw) - 8:
                raise PrunedFormatError(
                    f"{path} is not a safetensors file (header length {n} for "
                    f"{len(raw)} bytes); it may be truncated: export it again"
                )
            text = raw[8 : 8 + n]
    except OSError as e:
        raise PrunedFormatError(f"cannot read pruned model {path}: {e.strerror or e}") from None
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PrunedFormatError(
            f"{path} has an unreadable header ({_first_line(e)}); the file is damaged: export it again"
        ) from None
    if not isinstance(header, dict):
        raise PrunedFormatError(f"{path} has an unreadable header (not a mapping); export it again")
    return header, 8 + n


def _check_format(path: Path, meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise PrunedFormatError(
            f"{path} is not a varprune pruned-model file (format {str(found)[:40]!r}); "
            f"was it written by checkpoint.save_weights or another tool?"
        )
    if meta.get("format_version") not in [str(v) for v in READ_VERSIONS]:
        raise PrunedFormatError(
            f"{path} has {FORMAT} version {str(meta.get('format_version'))[:20]!r}; this "
            f"varprune reads versions {', '.join(map(str, READ_VERSIONS))}: upgrade varprune or export again"
        )
    return meta


def read_pruned_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a [`save_pruned`][varprune.storage.pruned_format.save_pruned] file, JSON fields decoded;
    reads the header only.

    Decoded: format_version (int), layout (list of [name, shape, kept]),
    realised_sparsity (float), model_args and dataset (when present); other
    fields are the stored strings. The payload and checksum are NOT verified
    here ([`load_pruned`][varprune.storage.pruned_format.load_pruned] does). Raises PrunedFormatError for an unreadable
    or foreign file.
    """
    path = Path(path)
    header, _ = _read_header(path)
    return _decode_meta(path, _check_format(path, header.get("__metadata__")))


def _decode_meta(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(meta)
    for key in _JSON_META:
        if key in out:
            try:
                out[key] = json.loads(out[key])
            except (ValueError, TypeError, RecursionError):
                raise PrunedFormatError(f"{path} has corrupt metadata {key!r} (not JSON); export it again") from None
    return out


def _untie(path: Path, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense entries a version-2 file stored once, filled from their twins (the same tensor object: on load
    both names receive the same values, and a model that ties them keeps one parameter)."""
    tied = info.get(TIED_KEY, {})
    ok = isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items())
    if not ok or (tied and info.get("format_version") != TIED_VERSION):
        raise PrunedFormatError(
            f"{path} has inconsistent metadata: {TIED_KEY!r} is malformed (or in a version-1 file); export it again"
        )
    out = dict(tensors)
    for name, twin in tied.items():
        if name in out or twin not in out:
            raise PrunedFormatError(
                f"{path} has inconsistent metadata: tied entry {name[:60]!r} and its twin {twin[:60]!r} do not fit "
                f"the stored tensors; export it again"
            )
        out[name] = out[twin]
    return out


def _check_layout(
    path: Path, layout: Any, masks: torch.Tensor, values: torch.Tensor, values_dtype: torch.dtype
) -> list[tuple[str, list[int], int]]:
    """Every shape, kept count and stream length consistent, before anything is allocated."""

    def bad(what: str) -> PrunedFormatError:
        return PrunedFormatError(f"{path} has inconsistent metadata: {what}; export it again")

    if not isinstance(layout, list) or not layout:
        raise bad("layout is not a non-empty list")
    out, seen, total, kept_total = [], set(), 0, 0
    for entry in layout:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and all(type(d) is int and d >= 0 for d in entry[1])
            and type(entry[2]) is int
        ):
            raise bad(f"layout entry {str(entry)[:60]} is not [name, shape, kept]")
        name, shape, kept = entry
        if name in seen:
            raise bad(f"{name!r} appears twice in the layout")
        seen.add(name)
        numel = math.prod(shape)
        if not 0 <= kept <= numel:
            raise bad(f"{name!r} keeps {kept} of {numel} weights")
        out.append((name, shape, kept))
        total += numel
        kept_total += kept
    if masks.dtype != torch.uint8 or masks.dim() != 1:
        raise bad(f"{MASKS_KEY} is {masks.dtype} of {masks.dim()} dims, not 1-D uint8")
    if masks.numel() != (total + 7) // 8:
        raise bad(f"the layout's {total} mask bits need {(total + 7) // 8} bytes, {MASKS_KEY} holds {masks.numel()}")
    if values.dtype != values_dtype or values.dim() != 1:
        raise bad(f"{VALUES_KEY} is {values.dtype} of {values.dim()} dims, not 1-D {values_dtype}")
    if values.numel() != kept_total:
        raise bad(f"the layout keeps {kept_total} values, {VALUES_KEY} holds {values.numel()}")
    return out


def _build_model(build: Callable[[], nn.Module]) -> nn.Module:
    model = build()
    if not isinstance(model, nn.Module):
        raise TypeError(f"build must return an nn.Module, got {type(model).__name__}")
    return model


def _shapes_on_meta(build: Callable[[], nn.Module]) -> dict[str, torch.Size] | None:
    """The state_dict shapes of ``build()`` without allocating memory (None if it cannot run on meta)."""
    try:
        with torch.device("meta"):
            model = build()
        return {k: v.shape for k, v in model.state_dict().items()}
    except Exception:  # a builder that cannot run on the meta device is checked after the real build
        return None


def _check_fits(
    path: Path, shapes: dict[str, torch.Size], dense: dict[str, torch.Tensor], layout: list[tuple[str, list[int], int]]
) -> None:
    stored = {k: tuple(v.shape) for k, v in dense.items()}
    for name, shape, _ in layout:
        if name in stored:
            raise PrunedFormatError(
                f"{path} has inconsistent metadata: {name!r} is stored both dense and pruned; export it again"
            )
        stored[name] = tuple(shape)
    missing = sorted(set(shapes) - set(stored))
    unexpected = sorted(set(stored) - set(shapes))
    wrong = [k for k in shapes if k in stored and tuple(shapes[k]) != stored[k]]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
            if unexpected
            else f"shape mismatch at {wrong[0]}: file {list(stored[wrong[0]])}, model {list(shapes[wrong[0]])}"
        )
        raise PrunedFormatError(
            f"{path} does not fit the model it names ({detail}); was the file written for another model or edited?"
        )


def load_pruned(
    path: str | os.PathLike, device: str | torch.device = "cpu", build: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """Rebuild a model from a [`save_pruned`][varprune.storage.pruned_format.save_pruned] file; returned in eval
    mode on ``device``.

    The model comes from ``varprune.models.create_model(metadata["model"],
    **metadata["model_args"])``, or from ``build()`` when given (called once on
    the meta device to check shapes before any memory is allocated, then once
    for real). Checks, in order: safetensors structure, format and version,
    the sha256 (any changed byte), the layout against the mask and value
    streams, the layout and dense entries against the model's state_dict, the
    popcount of every tensor's mask against its kept count. Pruned positions
    become +0.0; kept values are bit-for-bit the saved weights with fp32
    values, else the fp16/bf16 rounding of them, cast to the model's dtype.

    Every problem with the file raises PrunedFormatError (a ValueError) with
    one line naming the file and the problem.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PrunedFormatError(f"cannot read pruned model {path}: {e.strerror or e}") from None
    header, data_start = _read_header(path, raw)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError, RecursionError) as e:
        raise PrunedFormatError(
            f"{path} is not a readable safetensors file ({_first_line(e)}); it may be truncated: export it again"
        ) from None
    meta = _check_format(path, header.get("__metadata__"))
    if not all(isinstance(v, str) for v in meta.values()):
        raise PrunedFormatError(f"{path} has corrupt metadata (non-string values); export it again")
    if _digest(meta, _table(header), memoryview(raw)[data_start:]) != meta.get("sha256"):
        raise PrunedFormatError(f"{path} fails its sha256 check: the file was damaged or edited; export it again")
    # from here on the bytes are as written; what follows guards against a writer that lied
    info = _decode_meta(path, meta)
    values_dtype = VALUE_DTYPES.get(str(info.get("values_dtype")))
    if values_dtype is None:
        raise PrunedFormatError(f"{path} has unknown values_dtype {str(info.get('values_dtype'))[:20]!r}")
    if MASKS_KEY not in tensors or VALUES_KEY not in tensors:
        raise PrunedFormatError(f"{path} lacks {MASKS_KEY} or {VALUES_KEY}; export it again")
    masks_bytes = tensors.pop(MASKS_KEY)
    values = tensors.pop(VALUES_KEY)
    layout = _check_layout(path, info.get("layout"), masks_bytes, values, values_dtype)

    if build is None:
        name, args = info.get("model"), info.get("model_args", {})
        if not isinstance(name, str) or not isinstance(args, dict):
            raise PrunedFormatError(
                f"{path} does not name its model (metadata 'model' and 'model_args'); pass build= to load_pruned"
            )
        from varprune.models import create_model, list_models

        if name not in list_models() and not name.startswith(("timm:", "hf:")):
            raise PrunedFormatError(
                f"{path} names model {name!r}, which is not registered here: pass build= to load_pruned, a "
                f"function returning the model (load_pruned(path, build=lambda: MyModel())), or register it under "
                f"that name first (@register_model({name!r}, ...))"
            )
        model_name: str = name

        def build() -> nn.Module:
            try:
                return create_model(model_name, **args)
            except (TypeError, ValueError) as e:
                raise PrunedFormatError(
                    f"{path} names a model that cannot be built ({name!r}, {str(args)[:60]}): {_first_line(e)}"
                ) from None

    tensors = _untie(path, info, tensors)
    shapes = _shapes_on_meta(build)
    if shapes is not None:
        _check_fits(path, shapes, tensors, layout)
    model = _build_model(build)
    own = model.state_dict()
    _check_fits(path, {k: v.shape for k, v in own.items()}, tensors, layout)

    bits = unpack_bits(masks_bytes, (masks_bytes.numel() * 8))
    if bool(bits[sum(math.prod(s) for _, s, _ in layout) :].any()):
        raise PrunedFormatError(f"{path} has inconsistent metadata: spare mask bits are set; export it again")
    state = dict(tensors)
    bit_at = value_at = 0
    for name, shape, kept in layout:
        numel = math.prod(shape)
        keep = bits[bit_at : bit_at + numel]
        if int(keep.sum()) != kept:
            raise PrunedFormatError(
                f"{path} has inconsistent metadata: {name!r} has {int(keep.sum())} mask bits "
                f"set but the layout says {kept} kept; export it again"
            )
        dense = torch.zeros(numel, dtype=own[name].dtype)
        dense[keep] = values[value_at : value_at + kept].to(own[name].dtype)
        state[name] = dense.view(shape)
        bit_at += numel
        value_at += kept
    bad = non_finite(state)
    if bad:
        raise PrunedFormatError(
            f"{path} holds non-finite values (inf or nan) in {', '.join(bad[:3])}: export never writes them, so the "
            f"file was damaged or edited; export it again"
        )
    detail = state_mismatch(model, state)
    if detail is not None:  # unreachable after _check_fits; kept as a guard
        raise PrunedFormatError(f"{path} does not fit the model it names ({detail})")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise PrunedFormatError(f"{path} does not fit the model it names ({_first_line(e)})") from None
    return model.to(device).eval()


def pruned_is_ours(path: str | os.PathLike) -> bool:
    """Was ``path`` written by `save_pruned` (and is it intact)? What ``export`` may replace without
    ``--overwrite``."""
    try:
        read_pruned_metadata(path)
        return True
    except (PrunedFormatError, OSError):
        return False
