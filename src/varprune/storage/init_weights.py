"""Start a run from trained weights in a local file (``--init FILE``).

Two formats, told apart by content rather than by suffix:

* safetensors (``varprune``'s own model.safetensors, Hugging Face exports),
  read with ``safetensors.torch.load_file``;
* a PyTorch file written by ``torch.save``, read with
  ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and
  plain containers. A checkpoint that nests its state dict under
  ``"state_dict"``, ``"model"``, ``"model_state_dict"``, ``"model_state"`` or
  ``"net"`` is accepted and the key is reported.

Names saved from a wrapped model are unwrapped: a prefix that every key
carries and no key of the model does (``module.`` from DataParallel/DDP,
``_orig_mod.`` from torch.compile, ``model.``) is stripped, repeatedly, and the
report says so. ``exclude`` holds shell patterns (fnmatch) of names to leave
at the model's own initialisation on both sides, e.g. ``fc.*`` for a
classifier trained for another number of classes.

Every other name must match in both directions with equal shapes, or
:class:`InitWeightsError` says what is missing, unexpected or of another
shape. One exception: BatchNorm's ``num_batches_tracked`` counters may be
absent from the file (older PyTorch and many exporters drop them); the
model's own are kept. Nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from varprune.storage.checkpoint import tied_entries

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net")
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class InitWeightsError(ValueError):
    """The initial-weights file is unreadable or does not fit the model."""


@dataclass
class InitReport:
    """What :func:`load_initial_weights` did."""

    path: str
    format: str  # "safetensors" | "torch"
    container_key: str | None = None  # e.g. "state_dict" when the file nested it
    stripped_prefixes: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    kept_from_model: list[str] = field(default_factory=list)  # excluded or optional: left at init
    ignored_from_file: list[str] = field(default_factory=list)  # excluded names found in the file

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.format})"]
        if self.container_key:
            parts.append(f"from its {self.container_key!r} entry")
        if self.stripped_prefixes:
            parts.append("stripped prefix " + "".join(self.stripped_prefixes))
        if self.kept_from_model:
            parts.append(f"kept the model's own {len(self.kept_from_model)} ({_first(self.kept_from_model)})")
        if self.ignored_from_file:
            parts.append(f"ignored {len(self.ignored_from_file)} from the file ({_first(self.ignored_from_file)})")
        return "; ".join(parts)


def _first(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... {len(names) - n} more" if len(names) > n else "")


def _short(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:100]


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Read a safetensors or torch.save file: ``(tensors by name, format, container key)``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InitWeightsError(f"cannot read initial weights {path}: {e.strerror or e}") from None
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch.save) or a legacy pickle
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch's own advice (to load unsafely) is not ours to print
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused an object: say so in varprune's words
            raise InitWeightsError(
                f"{path} holds Python objects, not only tensors (a pickled model or optimizer?); varprune reads "
                f"weights without executing code: save model.state_dict() with torch.save, or use safetensors"
            ) from None
        except Exception:  # truncated or damaged archives, and anything else torch refuses
            raise InitWeightsError(
                f"{path} is not a readable PyTorch weights file (truncated or damaged?); save model.state_dict() "
                f"with torch.save again, or use safetensors"
            ) from None
        state, container = _unnest(obj, path)
        return state, "torch", container
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as e:
        raise InitWeightsError(f"{path} is neither a safetensors file nor a torch.save file ({_short(e)})") from None
    if not state:
        raise InitWeightsError(f"{path} holds no tensors")
    return state, "safetensors", None


def _is_state(obj) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unnest(obj, path) -> tuple[dict[str, torch.Tensor], str | None]:
    if _is_state(obj):
        return dict(obj), None
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if _is_state(obj.get(key)):
                return dict(obj[key]), key
    what = f"a dict with keys {list(obj)[:4]}" if isinstance(obj, dict) else type(obj).__name__
    raise InitWeightsError(
        f"{path} holds {what}, not a state dict of tensors (nor one under {', '.join(CONTAINER_KEYS)})"
    )


def _strip_wrappers(state: dict[str, torch.Tensor], own: Iterable[str]) -> tuple[dict, list[str]]:
    own = list(own)
    stripped = []
    while True:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in own):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped.append(prefix)
                break
        else:
            return state, stripped


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _suggest_excludes(names: list[str]) -> str:
    modules = sorted({n.rsplit(".", 1)[0] + ".*" if "." in n else n for n in names})
    return " ".join(f"--init-exclude '{m}'" for m in modules[:3])


def load_initial_weights(model: nn.Module, path: str | os.PathLike, exclude: Iterable[str] = ()) -> InitReport:
    """Copy the tensors of ``path`` into ``model`` in place; return an :class:`InitReport`.

    ``exclude``: fnmatch patterns of parameter/buffer names (after prefix
    stripping) that keep the model's own values; file entries matching them
    are ignored. Raises :class:`InitWeightsError` (a ValueError) with one line
    when the file is unreadable or any remaining name is missing, unexpected
    or of another shape. dtypes are cast to the model's; the model's device
    is kept. On error the model is left untouched.
    """
    patterns = [str(p) for p in exclude]
    state, fmt, container = read_state_file(path)
    own = model.state_dict()
    state, stripped = _strip_wrappers(state, own)
    report = InitReport(str(path), fmt, container, stripped)

    report.ignored_from_file = sorted(k for k in state if _matches(k, patterns))
    excluded_own = [k for k in own if _matches(k, patterns)]
    tied = tied_entries(own)  # a tied weight stored once (a run's, save_pretrained's lm_head): loaded by its twin
    missing = [k for k in own if k not in state and not _matches(k, patterns) and tied.get(k) not in state]
    optional = [k for k in missing if k.rsplit(".", 1)[-1] in _OPTIONAL_SUFFIXES]
    missing = [k for k in missing if k not in optional]
    unexpected = sorted(k for k in state if k not in own and not _matches(k, patterns))
    wrong = [k for k in own if k in state and not _matches(k, patterns) and state[k].shape != own[k].shape]

    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_first(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if wrong:
            k = wrong[0]
            more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
            problems.append(
                f"{len(wrong)} of another shape ({k}: file {list(state[k].shape)}, model {list(own[k].shape)}{more})"
            )
        hint = _suggest_excludes(wrong + missing + unexpected)
        raise InitWeightsError(
            f"{path} does not fit this model: {'; '.join(problems)}; "
            f"check --model, or keep the model's own layers with {hint}"
        )

    new_state = dict(own)
    for k in own:
        if k in state and not _matches(k, patterns):
            new_state[k] = state[k]
            report.loaded.append(k)
    if not report.loaded:
        raise InitWeightsError(f"{path}: nothing left to load after --init-exclude {' '.join(patterns)}")
    try:
        model.load_state_dict(new_state)  # copies, casting dtype, onto the parameters' own device
    except (RuntimeError, TypeError, ValueError) as e:
        raise InitWeightsError(f"{path} does not fit this model ({_short(e)})") from None
    report.kept_from_model = excluded_own + optional
    return report
