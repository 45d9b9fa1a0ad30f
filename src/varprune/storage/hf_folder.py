"""A model as a Hugging Face model folder: what ``from_pretrained`` and ``AutoTokenizer`` read.

`save_hf_folder` writes, into a new folder:

* ``config.json``: the model's configuration as ``save_pretrained`` writes it
  (``architectures`` and ``dtype`` set from the model);
* ``generation_config.json`` where transformers writes one (models that can
  generate);
* ``model.safetensors``: every tensor of the state dict (pruned weights are
  exact zeros; floating-point tensors in the model's dtype, or fp16/bf16 with
  ``values=``), tied weights stored once under the name transformers keeps
  (``lm_head.weight`` tied to the embedding is left out, as
  ``save_pretrained`` does), written by `serialize_safetensors`: sorted,
  deterministic bytes, metadata ``"format": "pt"`` (transformers refuses
  safetensors without it), the caller's ``metadata`` and a ``sha256``;
* with a tokenizer: ``tokenizer.json`` and a minimal ``tokenizer_config.json``
  (``PreTrainedTokenizerFast``, the special tokens, ``model_max_length``) so
  ``AutoTokenizer.from_pretrained(DIR)`` works.

One file, no shards: the whole state dict is serialised in memory (twice the
weights' size at the peak); fine for the models varprune trains, not for a
70B checkpoint. The folder is written as a hidden sibling
(``.NAME.partial-XXXX``) and renamed into place at the end, so a reader sees
no folder or the whole one; an existing ``out_dir`` is never replaced (the
caller decides about overwriting). An interrupted save leaves only the hidden
sibling.

`load_hf_folder` checks the sha256 and loads through ``hf:<dir>``
(models/hf.py); `read_hf_metadata` returns the metadata.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from varprune.storage.checkpoint import DIGEST_KEY, _metadata, serialize_safetensors, verify_digest

WEIGHTS = "model.safetensors"
_RESERVED = ("format", DIGEST_KEY)


class HFFolderError(ValueError):
    """A model folder cannot be written (it exists, the model or tokenizer is not fit) or read."""


def _tokenizer_text(tokenizer_json) -> str:
    """tokenizer.json's text from a ``tokenizers.Tokenizer``, a path (``os.PathLike``) or the JSON text."""
    if hasattr(tokenizer_json, "to_str"):
        return tokenizer_json.to_str()
    if isinstance(tokenizer_json, os.PathLike):
        try:
            return Path(tokenizer_json).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise HFFolderError(f"cannot read tokenizer {tokenizer_json}: {e}") from None
    if isinstance(tokenizer_json, bytes):
        tokenizer_json = tokenizer_json.decode()
    if isinstance(tokenizer_json, str):
        return tokenizer_json
    raise HFFolderError(
        f"tokenizer_json must be a tokenizers.Tokenizer, a path or the JSON text, not {type(tokenizer_json).__name__}"
    )


def _tokenizer_files(text: str, config, special_tokens: dict | None) -> dict[str, bytes]:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own Exception type
        raise HFFolderError(f"tokenizer_json is not a tokenizers JSON ({str(e).splitlines()[0][:100]})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise HFFolderError(f"the tokenizer has {size} tokens but the model's embedding only {config.vocab_size} rows")
    cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and tok.id_to_token(token_id) is not None:
            cfg[f"{role}_token"] = tok.id_to_token(token_id)
    unk = getattr(tok.model, "unk_token", None)
    if isinstance(unk, str) and tok.token_to_id(unk) is not None:
        cfg["unk_token"] = unk
    roles = _template_roles(json.loads(text).get("post_processor"))
    cfg.update({role: token for role, token in roles.items() if tok.token_to_id(token) is not None})
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, key, None), int):
            cfg["model_max_length"] = getattr(config, key)
            break
    for role, token in (special_tokens or {}).items():
        if tok.token_to_id(token) is None:
            raise HFFolderError(f"special token {role}={token!r} is not in the tokenizer's vocabulary")
        cfg[role if role.endswith("_token") else f"{role}_token"] = token
    return {
        "tokenizer.json": text.encode(),
        "tokenizer_config.json": (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(),
    }


def _template_roles(post) -> dict[str, str]:
    """``cls_token`` / ``sep_token`` from the special tokens a tokenizer adds around a single text: the
    post-processor's first token before the text and last one after it (BERT's ``[CLS] $A [SEP]``, varprune's own
    ``<cls> $A``), so that ``AutoTokenizer`` knows them by role, as a BERT folder's own tokenizer_config does."""
    if not isinstance(post, dict):
        return {}
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        return {f"{role}_token": post[role][0] for role in ("cls", "sep") if isinstance(post.get(role), list)}
    if post.get("type") != "TemplateProcessing" or not isinstance(post.get("single"), list):
        return {}
    single = [piece for piece in post["single"] if isinstance(piece, dict)]
    kinds = ["SpecialToken" in piece for piece in single]
    if False not in kinds:  # no $A in the template: nothing to place the tokens by
        return {}
    first, last = kinds.index(False), len(kinds) - 1 - kinds[::-1].index(False)
    roles = {}
    if first > 0:
        roles["cls_token"] = single[0]["SpecialToken"]["id"]
    if last < len(single) - 1:
        roles["sep_token"] = single[-1]["SpecialToken"]["id"]
    return roles


VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every floating-point tensor as ``dtype``; a finite value beyond float16's range is refused, not made inf."""
    if dtype is None:
        return state
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and t.dtype != dtype:
            if dtype == torch.float16:
                finite = t[torch.isfinite(t)].abs()
                if finite.numel() and float(finite.max()) > torch.finfo(torch.float16).max:
                    raise HFFolderError(
                        f"{name} holds values up to {float(finite.max()):.4g}, beyond float16's range: "
                        f"write bf16 or fp32 values"
                    )
            t = t.to(dtype)
        out[name] = t
    return out


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as save_pretrained stores it: ignored keys and tied duplicates removed."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    if any(t.device.type == "meta" for t in state.values()):
        raise HFFolderError("the model is on the meta device (shapes only); load or train its weights first")
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        # model: any transformers-like model with a config (save_hf_folder checks it), typed nn.Module here
        state = remove_tied_weights_from_state_dict(state, model)  # type: ignore[arg-type]
    except ImportError:  # another transformers version: keep the first name of each storage
        seen: set = set()
        for key in list(state):
            ptr = (state[key].untyped_storage().data_ptr(), state[key].storage_offset(), state[key].shape)
            if ptr in seen:
                del state[key]
            seen.add(ptr)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)  # type: ignore[arg-type]  # as above
    except ImportError:
        pass
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_json=None,
    metadata: dict[str, str] | None = None,
    *,
    special_tokens: dict[str, str] | None = None,
    values: str | None = None,
) -> Path:
    """Write ``model`` (a transformers ``PreTrainedModel``) as a Hugging Face model folder ``out_dir``.

    ``tokenizer_json``: a ``tokenizers.Tokenizer``, a path to a
    ``tokenizer.json`` (``os.PathLike``) or its JSON text (``str``); it must
    fit the model's vocabulary. Its ``tokenizer_config.json`` names the bos,
    eos and pad tokens of the model's config, the tokenizer's unk token and
    the cls/sep tokens its post-processor puts around a text;
    ``special_tokens`` (``{"cls_token": "[CLS]", ...}``) adds or replaces
    roles. ``metadata``: strings stored in model.safetensors' header (not
    ``format`` or ``sha256``). ``values``: ``"fp32"``, ``"fp16"`` or ``"bf16"``
    writes every floating-point tensor in that dtype (and config.json's
    ``dtype`` says so; a value beyond float16's range is refused); None (the
    default) keeps the model's dtypes. Returns the folder's path.

    Raises `HFFolderError` (a ValueError) if ``out_dir`` exists or the
    model/tokenizer is not fit, OSError (naming ``out_dir``) if the disk fails;
    nothing is left at ``out_dir`` in either case.
    """
    out = Path(out_dir)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise HFFolderError(f"a Hugging Face model folder needs a transformers model, not a {type(model).__name__}")
    if os.path.lexists(out):
        raise HFFolderError(f"{out} exists; varprune does not replace a folder: remove it or choose another")
    if values is not None and values not in VALUE_DTYPES:
        raise HFFolderError(f"values must be one of {', '.join(VALUE_DTYPES)}, not {values!r}")
    cast = VALUE_DTYPES[values] if values is not None else None
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str) or k in _RESERVED]
    if bad:
        raise HFFolderError(f"metadata must map strings to strings, without {' or '.join(_RESERVED)}; check {bad[:3]}")
    files: dict[str, bytes] = {}
    if tokenizer_json is not None:
        files.update(_tokenizer_files(_tokenizer_text(tokenizer_json), config, special_tokens))
    elif special_tokens:
        raise HFFolderError("special_tokens needs tokenizer_json")
    weights = serialize_safetensors(_cast(_state_to_save(model), cast), {**meta, "format": "pt"})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        cfg = copy.deepcopy(config)
        cfg.architectures = [type(model).__name__]
        dtype = cast or getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            cfg.dtype = str(dtype).split(".")[1]
        cfg.save_pretrained(tmp)
        can_generate = getattr(model, "can_generate", None)
        generation_config = getattr(model, "generation_config", None)
        if callable(can_generate) and can_generate() and generation_config is not None:
            generation_config.save_pretrained(tmp)
        for name, data in {WEIGHTS: weights, **files}.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.lexists(out):  # created while we wrote: still not ours to replace
            raise HFFolderError(f"{out} appeared while it was written; not replaced (the new folder is discarded)")
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(out)) from None
        raise
    _fsync_dir(out.parent)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def folder_weights_digest(folder: str | os.PathLike) -> str:
    """sha256 of a model folder's weights: model.safetensors, or of a sharded folder the sha256 of its shards'
    names and sha256s (in name order), so that any changed weight changes it."""
    import hashlib

    from varprune.storage.files import file_digest

    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return file_digest(folder / WEIGHTS)
    h = hashlib.sha256()
    for shard in sorted(folder.glob("model-*.safetensors")):
        h.update(f"{shard.name}\0{file_digest(shard)}\n".encode())
    return h.hexdigest()


def read_hf_metadata(folder: str | os.PathLike) -> dict[str, str]:
    """The metadata of ``folder``/model.safetensors, after checking its sha256 (files without one pass)."""
    path = Path(folder) / WEIGHTS
    try:
        raw = path.read_bytes()
        meta = _metadata(raw)
    except OSError as e:
        raise HFFolderError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, OverflowError) as e:
        raise HFFolderError(f"{path} is not a safetensors file ({type(e).__name__})") from None
    verify_digest(raw, path, "write the folder again")
    return meta


def load_hf_folder(folder: str | os.PathLike, num_classes: int = 2, **kwargs) -> nn.Module:
    """Check ``folder``'s sha256, then ``create_model("hf:" + folder, num_classes=..., **kwargs)``
    (``task``, ``vocab_size``, ``dtype``...: see models/hf.py)."""
    from varprune.models import create_model

    read_hf_metadata(folder)
    return create_model(f"hf:{folder}", num_classes=num_classes, **kwargs)
