"""A training checkpoint's contents: what it must hold to resume a run bitwise, checked before it is trusted.

The file format itself (safetensors, atomic, checksummed) is storage.checkpoint's; this module knows what a
varprune run puts in it: epoch, configuration, model, optimizer, RNG states and the metrics history.
"""

from __future__ import annotations

from pathlib import Path

import torch

from varprune.data import DeviceLoader
from varprune.engine.config import LOCATION_KEYS, TrainConfig
from varprune.errors import CheckpointError, short
from varprune.storage.checkpoint import load_model_state


def _rng_state(device: torch.device, loader: DeviceLoader) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": loader.generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, loader: DeviceLoader) -> None:
    torch.set_rng_state(state["torch"])
    loader.generator.set_state(state["loader"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(obj) -> bool:
    """Only JSON values (no tensors) in a nested structure."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(map(_plain, obj))
    return obj is None or isinstance(obj, (bool, int, float, str))


def check_checkpoint(state: dict, cfg: TrainConfig, path: Path) -> None:
    """Is ``state`` a complete training checkpoint of the run configured by ``cfg``?"""

    def bad(what):
        return CheckpointError(
            f"{path} is not a complete training checkpoint ({what}); retrain with `varprune train --overwrite`"
        )

    for key, kind in (
        ("epoch", int),
        ("config", dict),
        ("model", dict),
        ("optimizer", dict),
        ("rng", dict),
        ("history", list),
    ):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise bad(f"no valid {key!r}")
    if not _plain(state["config"]):
        raise bad("its configuration holds tensors")
    rng = state["rng"]
    for key in ("torch", "loader"):
        if not isinstance(rng.get(key), torch.Tensor) or rng[key].dtype != torch.uint8:
            raise bad(f"no valid RNG state {key!r}")
    if not all(isinstance(h, dict) for h in state["history"]) or len(state["history"]) != state["epoch"]:
        raise bad("metrics history does not match its epoch")
    own = {k: v for k, v in cfg.to_dict().items() if k not in LOCATION_KEYS}
    defaults = TrainConfig().to_dict()  # a checkpoint of an older version lacks the fields added since
    theirs = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in LOCATION_KEYS and k != "extra"}
    if own != theirs:
        diff = sorted(k for k in set(own) | set(theirs) if own.get(k, "?") != theirs.get(k, "?"))
        detail = ", ".join(f"{k} {short(theirs.get(k), 30)} vs {short(own.get(k), 30)}" for k in diff[:3])
        raise CheckpointError(
            f"{path} belongs to another run ({detail} in config.json); "
            f"was it copied from elsewhere? retrain with `varprune train --overwrite`"
        )
    if not 0 < state["epoch"] <= cfg.epochs:
        raise bad(f"epoch {state['epoch']} of {cfg.epochs}")


def _restore(state: dict, path: Path, model, optimizer, device: torch.device, loader: DeviceLoader) -> None:
    load_model_state(model, state["model"], path)
    bad = CheckpointError(
        f"{path} holds optimizer state of another method or model; retrain with `varprune train --overwrite`"
    )
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError):
        raise bad from None
    # torch accepts a momentum buffer of the wrong shape or dtype here and fails at the first step
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p, {})
            if not isinstance(entry, dict):
                raise bad
            for buf in entry.values():
                if isinstance(buf, torch.Tensor) and buf.dim() > 0 and (buf.shape != p.shape or buf.dtype != p.dtype):
                    raise bad
                if not isinstance(buf, (torch.Tensor, int, float)) and buf is not None:  # a string, a list
                    raise bad
    try:
        _set_rng_state(state["rng"], device, loader)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path} holds an invalid RNG state ({type(e).__name__}); retrain with `varprune train --overwrite`"
        ) from None
