"""Safe, atomic checkpoints: tensors in safetensors, everything else as JSON.

Nothing here unpickles: a checkpoint is one ``.safetensors`` file whose header
metadata holds a JSON document (config, epoch, scheduler state, metrics
history) and whose tensors hold the model, optimizer buffers and RNG states.
Nested state (an optimizer's ``state_dict()``) is flattened: tensors become
named entries, the rest of the structure stays in the JSON with a reference.

Files are written to a temporary name in the same folder, fsynced, then
renamed over the target: a reader sees the old file or the new one, never a
torn one.

Every file is written by :func:`serialize_safetensors`, our own few-line
safetensors writer (``safetensors.torch.save`` orders metadata keys at random,
so two saves of the same weights would differ): keys sorted, and a ``sha256``
in the metadata over the other metadata, the tensor table and the data. A
loader verifies it (:func:`verify_digest`), so a flipped byte inside a tensor
is refused instead of silently changing a weight; files of older versions,
without the digest, still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

FORMAT = "varprune-checkpoint-1"


from varprune.errors import CheckpointError  # noqa: E402  (re-exported)
from varprune.storage.files import atomic_write_bytes  # noqa: E402


def _identity(t: torch.Tensor) -> tuple | None:
    """What makes two tensors one (the same storage, offset, shape, strides and dtype); None where that cannot be
    told (meta or empty tensors, whose storage pointers say nothing)."""
    if type(t).__name__ == "DTensor":  # a sharded weight (FSDP2): its storage is this process's shard
        t = t.to_local()  # type: ignore[attr-defined]
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tied_entries(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: first name}`` for every entry of a state dict that is the same tensor as an earlier entry (a tied
    ``lm_head.weight`` and the token embedding): what a file needs to store only once."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, t in state.items():
        key = _identity(t)
        if key is None:
            continue
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, seen: dict | None = None) -> Any:
    """Replace every tensor in a nested structure by ``{"__tensor__": key}``; a tensor met again (a tied weight)
    refers to the key it was first stored under, so it is stored once and comes back as one tensor."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ident = _identity(obj)
        if ident is not None and ident in seen:
            return {"__tensor__": seen[ident]}
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        if ident is not None:
            seen[ident] = key
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot checkpoint a dict with keys {list(obj)[:3]}")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by int)
        return {"__dict__": [[k, flatten_state(v, tensors, f"{prefix}.{k}", seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}", seen) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint refers to a missing tensor {key!r}")
            return tensors[key]
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        raise CheckpointError("checkpoint metadata has an unknown structure")
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DIGEST_KEY = "sha256"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _table(header: dict) -> list:
    return [
        [name, info.get("dtype"), info.get("shape"), info.get("data_offsets")]
        for name, info in sorted(header.items())
        if name != "__metadata__" and isinstance(info, dict)
    ]


def _digest(meta: dict[str, str], table: list, data: bytes | memoryview) -> str:
    """sha256 over the metadata (less the digest), the tensor table and the data section."""
    canon = json.dumps(
        {"metadata": {k: v for k, v in meta.items() if k != DIGEST_KEY}, "tensors": table},
        sort_keys=True,
        separators=(",", ":"),
    )
    h = hashlib.sha256(canon.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def serialize_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file with sorted keys and a sha256 in the metadata; deterministic:
    the same tensors and metadata give the same bytes. Readable by any safetensors reader."""
    for name, t in tensors.items():
        if t.dtype not in ST_DTYPES:
            raise ValueError(f"cannot store tensor {name!r} of dtype {t.dtype} in a safetensors file")
    # widest elements first (as safetensors does), so every tensor sits at its natural alignment
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name in order:
        raw = _tensor_bytes(tensors[name])
        header[name] = {
            "dtype": ST_DTYPES[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    meta = dict(meta)
    meta[DIGEST_KEY] = _digest(meta, _table(header), data)
    header["__metadata__"] = meta
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data


def verify_digest(raw: bytes, path, fix: str) -> None:
    """Compare the sha256 that :func:`serialize_safetensors` stored with the bytes
    (a file that ``st_load`` accepted); files without one (older versions) pass."""
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or DIGEST_KEY not in meta:
        return
    if _digest(meta, _table(header), memoryview(raw)[8 + header_len :]) != meta[DIGEST_KEY]:
        raise CheckpointError(f"{path} fails its sha256 check: the file was damaged (a changed byte) or edited; {fix}")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a nested state (tensors and JSON-able values) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten_state(state, tensors, "s")
    atomic_write_bytes(path, serialize_safetensors(tensors, {"format": FORMAT, "state": json.dumps(meta)}))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        tensors = st_load(raw)
        meta = _metadata(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_first_line(e)}); "
            f"it may be truncated: resume from an intact run or retrain"
        ) from None
    verify_digest(raw, path, "resume from an intact copy or retrain with `varprune train --overwrite`")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a varprune checkpoint (format {str(meta.get('format'))[:40]!r})")
    try:
        state = unflatten_state(json.loads(meta["state"]), tensors)
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(
            f"{path} has corrupt metadata ({type(e).__name__}); retrain or resume elsewhere"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has corrupt metadata (not a mapping); retrain or resume elsewhere")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:80]


def _metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file that ``st_load`` accepted."""
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


TIED_KEY = "tied"


def save_weights(
    path: str | os.PathLike, model: torch.nn.Module, metadata: dict[str, str], state: dict | None = None
) -> None:
    """Final weights and buffers as plain safetensors (readable by any tool). Tied weights are stored once, under
    the first name (as ``save_pretrained`` does: a tied ``lm_head.weight`` is left out); the metadata's ``tied``
    maps each name left out to the one stored (JSON), and `load_weights` ties them again. ``state``: the
    model's state dict when the model cannot give it whole itself (sharded training gathers it first)."""
    own = model.state_dict() if state is None else state
    tied = tied_entries(own)
    kept = {k: v.detach().cpu().contiguous() for k, v in own.items() if k not in tied}
    meta = dict(metadata)
    if tied:
        meta[TIED_KEY] = json.dumps(tied, sort_keys=True)
    atomic_write_bytes(path, serialize_safetensors(kept, meta))


def load_weights(path: str | os.PathLike, model: torch.nn.Module, expect: dict[str, str] | None = None) -> None:
    """Load ``save_weights`` output into ``model``; a mismatch is a CheckpointError.

    ``expect`` (e.g. ``{"model": "resnet20"}``) is compared with the file's
    metadata where the file records that key.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read weights {path}: {e.strerror or e}") from None
    try:
        state = st_load(raw)
        meta = _metadata(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_first_line(e)}); it may be truncated: retrain the run"
        ) from None
    if meta.get("format") == "varprune-pruned":
        raise CheckpointError(
            f"{path} is a pruned model written by `varprune export`, not a run's final weights: evaluate it with "
            f"`varprune evaluate {path}`, or put the run's own model.safetensors back"
        )
    verify_digest(
        raw, path, f"delete it and `varprune train --resume {path.parent}` rewrites it from the checkpoint, or retrain"
    )
    for key, want in (expect or {}).items():
        if key in meta and meta[key] != want:
            raise CheckpointError(
                f"{path} holds the weights of {key} {str(meta[key])[:40]!r}, not {want!r}: "
                f"was it copied from another run?"
            )
    load_model_state(model, state, path)


def state_mismatch(model: torch.nn.Module, state: Any) -> str | None:
    """Why ``state`` cannot be a state_dict of ``model`` (None if it can)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "not a mapping of names to tensors"
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        return (
            f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
            if unexpected
            else f"shape mismatch at {wrong[:2]}"
        )
    return None


def load_model_state(model: torch.nn.Module, state: Any, path: str | os.PathLike) -> None:
    """``model.load_state_dict(state)``, any mismatch a one-line CheckpointError; non-finite values (inf, nan),
    which training never writes, are refused too. An entry the model ties to another (a tied ``lm_head.weight``)
    may be absent from ``state``: the tensor it shares is loaded once and serves both."""
    if isinstance(state, dict):
        state = dict(state)
        for name, kept in tied_entries(model.state_dict()).items():
            if name not in state and kept in state:
                state[name] = state[kept]
    detail = state_mismatch(model, state)
    if detail is not None:
        raise CheckpointError(f"{path} does not fit this model ({detail}): was it trained with another --model?")
    bad = non_finite(state)
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite values (inf or nan) in {', '.join(bad[:3])}: training never writes them, so the "
            f"file was damaged or edited; retrain the run"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model ({_first_line(e)})") from None


def non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding inf or nan."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
