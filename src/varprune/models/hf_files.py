"""An ``hf:<dir>`` folder's weights, checked before transformers reads them and after (models/hf.py loads).

Before (`check_weight_files`, headers only, no tensor is read): the weights are safetensors, one
``model.safetensors`` or the shards that ``model.safetensors.index.json`` names. Every shard must be a
``.safetensors`` file inside the folder: an index naming a ``.bin`` shard (pickle) is refused, so no pickle
ever reaches ``torch.load``. Each file's header must be readable and its tensors must fill the file exactly:
a truncated copy or random bytes is one line naming the file, not a ``SafetensorError`` traceback. A folder
of only ``pytorch_model*.bin`` (pickle) or a GGUF file is refused with how to convert it.

During (`transformers_quiet`): transformers' log records and Python warnings are collected instead of
printed, so that varprune's one line is the only one; what matters is read and translated: the load report
(``output_loading_info``) by `check_loaded`, out-of-vocabulary token ids of config.json by
`clear_bad_token_ids`. What is left is kept on the model (``varprune_load_notes``) and logged at INFO on
``varprune.load_notes``: a command prints each note once (``varprune: note: hf:DIR: ...``), a library caller
sees them only if it sets logging up.

After (`check_loaded`): every weight the model needs came from the folder, with its shape
(transformers would initialise a missing one randomly, say so in a log line and go on: a half-random model
then trains and prunes without a word); tied weights (an ``lm_head`` tied to the embedding) are not missing.
Every parameter must be finite (a NaN would otherwise surface as "non-finite loss" after a step).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import warnings
from pathlib import Path

import torch

from .registry import ModelError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_CLASSES = {
    "language-modeling": "AutoModelForCausalLM",
    "instruction-tuning": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
}


def gguf_advice(gguf: Path) -> str:
    return f"convert it into a model folder with `varprune convert-gguf {gguf} DIR`, then use hf:DIR"


def refuse_non_folder(path: Path) -> None:
    """A ``.gguf`` file given as ``hf:FILE``: say how to make a folder of it."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ModelError(f"hf:{path} is a GGUF file, not a Hugging Face model folder; {gguf_advice(path)}")


def _pickle_advice(path: Path, task: str | None) -> str:
    auto = _CLASSES.get(task or "", "AutoModel")
    return (
        f"convert them to safetensors once, where you trust the files (it unpickles them): "
        f'python -c "from transformers import {auto} as M; M.from_pretrained({str(path)!r})'
        f'.save_pretrained({str(path)!r})"'
    )


def check_weight_files(path: Path, task: str | None = None) -> list[Path]:
    """The folder's safetensors weight files, each header checked; a one-line ModelError otherwise."""
    if (path / SINGLE).is_file():
        files = [path / SINGLE]  # what transformers reads first when both are there
    elif (path / INDEX).is_file():
        files = _shards(path, task)
    else:
        ggufs = sorted(path.glob("*.gguf"))
        if any(path.glob("pytorch_model*.bin")):
            raise ModelError(
                f"hf:{path}: only pytorch_model*.bin weights (pickle), which varprune never loads; "
                + _pickle_advice(path, task)
            )
        if ggufs:
            raise ModelError(f"hf:{path} holds a GGUF file ({ggufs[0].name}), not safetensors; {gguf_advice(ggufs[0])}")
        raise ModelError(f"hf:{path}: no model.safetensors weights there (config.json alone); save the model into it")
    for file in files:
        check_header(file)
    return files


def _shards(path: Path, task: str | None) -> list[Path]:
    index = path / INDEX
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"hf:{path}: {INDEX} is not readable JSON ({str(e).splitlines()[0][:80]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"hf:{path}: {INDEX} has no weight_map of tensor names to shard files; copy the folder again")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name.endswith(".safetensors"):
            raise ModelError(
                f"hf:{path}: {INDEX} names the shard {name!r}, which is not a safetensors file; varprune loads "
                f"only safetensors weights (never pickle): " + _pickle_advice(path, task)
            )
        if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
            raise ModelError(f"hf:{path}: {INDEX} names the shard {name!r} outside the folder; copy the folder again")
        if not (path / name).is_file():
            raise ModelError(f"hf:{path}: {INDEX} names the shard {name}, which is not there; copy the folder again")
    return [path / name for name in names]


def check_header(file: Path) -> dict:
    """``file``'s safetensors header (name -> entry), after checking that its tensors fill the file exactly."""

    def bad(reason: str) -> ModelError:
        return ModelError(
            f"{file} is not a readable safetensors file ({reason}): copy the folder again, or save the model "
            f"anew with save_pretrained"
        )

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise bad("truncated, or not safetensors: its header length does not fit the file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"cannot read {file}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_len, spans = size - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        shape, span = entry.get("shape"), entry.get("data_offsets")
        ok = (
            isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(span, list)
            and len(span) == 2
            and all(isinstance(x, int) for x in span)
            and 0 <= span[0] <= span[1]
        )
        if not ok or not isinstance(shape, list) or not isinstance(span, list):
            raise bad(f"the entry of {str(name)[:60]!r} is malformed")
        element = _SIZES.get(str(entry.get("dtype")))
        if element is not None and span[1] - span[0] != math.prod(shape) * element:
            raise bad(f"{str(name)[:60]!r} does not fill its bytes")
        spans.append(tuple(span))
    end = max((s[1] for s in spans), default=0)
    if end > data_len:
        raise bad(f"truncated: its tensors need {end:,} bytes of data, the file holds {data_len:,}")
    spans.sort()
    if any(a[1] != b[0] for a, b in itertools.pairwise(spans)) or (spans and spans[0][0] != 0) or end != data_len:
        raise bad("its tensors do not fill the file exactly")
    return header


# ------------------------------------------------------------------ transformers' own messages


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.into.append(" ".join(record.getMessage().split())[:500])


@contextlib.contextmanager
def transformers_quiet(collected: list[str]):
    """Collect transformers' warnings (its logger's records and Python warnings) into ``collected`` instead of
    printing them, and turn its progress bars off; everything is restored on exit."""
    from transformers.utils import logging as tlog

    root = tlog.get_logger()  # the library's root logger, "transformers"
    level, bar, propagate = root.level, tlog.is_progress_bar_enabled(), root.propagate
    handlers = list(root.handlers)
    collect = _Collect(collected)
    for h in handlers:
        root.removeHandler(h)
    root.addHandler(collect)
    root.setLevel(logging.WARNING)
    root.propagate = False
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        collected.extend(" ".join(str(w.message).split())[:500] for w in caught)
    finally:
        root.removeHandler(collect)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        root.propagate = propagate
        if bar:
            tlog.enable_progress_bar()


def clear_bad_token_ids(config, given: set[str], notes: list[str]) -> None:
    """Special token ids of config.json outside the vocabulary (transformers only warns: "may result in unexpected
    behavior"; tiny configs inherit GPT-2's 50256) become None, each said in ``notes``; ids the caller gave are kept
    (they were checked against the vocabulary)."""
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id"):
        value = getattr(config, key, None)
        if key in given or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) and 0 <= v < vocab for v in values):
            continue
        setattr(config, key, None)
        notes.append(f"config.json's {key} {value} is outside the vocabulary (0..{vocab - 1}): not used")


# ------------------------------------------------------------------ after loading


def check_loaded(path: Path, model: torch.nn.Module, info: dict, task: str, keep_head: bool) -> set[str]:
    """Read transformers' load report: refuse weights it initialised because the folder lacks them (or holds
    them in another shape), except a classifier's new head; refuse non-finite values. Returns the names of the
    parameters that did not come from the folder (the new head)."""
    missing = {k for k in info.get("missing_keys", ()) if isinstance(k, str)}
    mismatched = {k[0]: (k[1], k[2]) for k in info.get("mismatched_keys", ()) if isinstance(k, (tuple, list))}
    errors = [e for e in info.get("error_msgs", ()) if e]
    if errors:
        first = " ".join(str(errors[0]).split())[:160]
        raise ModelError(f"hf:{path}: transformers could not load its weights ({first})")
    prefix = getattr(model, "base_model_prefix", "") + "."
    new_head = set()
    if task == "text-classification":  # the head (and BERT's pooler when the folder has none) is new by design
        pooler = prefix + "pooler."
        new_head = {k for k in missing | set(mismatched) if not k.startswith(prefix) or k.startswith(pooler)}
        if keep_head:
            new_head = {k for k in new_head if k.startswith(prefix)}
    lacking = sorted(missing - new_head)
    if lacking:
        shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
        raise ModelError(
            f"hf:{path}: its weights lack {shown} (transformers would initialise them randomly); "
            f"the folder is incomplete or of another architecture: copy it again or save the whole model"
        )
    wrong = sorted(set(mismatched) - new_head)
    if wrong:
        have, want = mismatched[wrong[0]]
        raise ModelError(
            f"hf:{path}: {wrong[0]} has shape {list(have)} in the folder but {list(want)} in its config.json"
            + (f" ({len(wrong) - 1} more)" if len(wrong) > 1 else "")
            + "; the weights do not match the config: copy the folder again"
        )
    bad = non_finite_tensors(model)
    if bad:
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        hint = (
            f" (as {str(dtype).split('.')[1]}: values beyond its range become inf; load in float32)"
            if dtype == torch.float16
            else ""
        )
        raise ModelError(
            f"hf:{path}: {bad[0]} holds non-finite values (inf or nan){hint}"
            + (f", and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else "")
            + "; the folder's weights are damaged: copy them again"
        )
    return set(new_head) if task == "text-classification" else set()


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point parameters that hold inf or nan (each tied parameter once; buffers
    are left alone: a mask buffer may hold -inf by design)."""
    with torch.no_grad():
        return [
            name
            for name, t in model.named_parameters()
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())
        ]
