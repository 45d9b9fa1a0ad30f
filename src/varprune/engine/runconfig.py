"""A run folder's ``config.json`` read back: the configuration, checked, and what the machine resolved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from varprune.engine.checks import problems
from varprune.engine.config import TrainConfig
from varprune.errors import RunError

# ---------------------------------------------------------------- config.json


# where a model folder given as a RUN is sent (prune, export, evaluate and finetune take it as --model hf:DIR)
_FOLDER_ROUTE = (
    "give it as --model hf:{folder} with --dataset D (and --data-dir X), e.g. `varprune prune --model hf:{folder} "
    "--dataset D --data-dir X --out OUT` (export and finetune alike; `varprune evaluate hf:{folder} --dataset D`)"
)


def load_run_config(run: Path) -> TrainConfig:
    """A run folder's configuration, checked; any problem is one :class:`RunError` line."""
    from varprune.engine.rundir import RUN_FILES

    run = Path(run)
    path = run / "config.json"
    if str(run).startswith("hf:"):
        raise RunError(f"{run} names a model folder, not a run: {_FOLDER_ROUTE.format(folder=str(run)[3:])}")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if run.is_dir() and any((run / name).exists() for name in RUN_FILES):
            raise RunError(
                f"{run} has no config.json but holds run files: the folder is damaged; retrain it with "
                f"`varprune train --overwrite --out {run} ...`"
            ) from None
        if run.is_dir() and any(run.glob(".config.json.*.tmp")):
            raise RunError(
                f"{run} was interrupted before its configuration was written, so nothing can be "
                f"resumed; start it again with `varprune train --out {run} ...`"
            ) from None
        if (run / "study.json").is_file():
            raise RunError(
                f"{run} is a study folder, not a run: its runs are in {run / 'runs'} (the study prunes "
                f"them itself; `varprune report {run}` prints its table)"
            ) from None
        if (run / "tune.json").is_file():
            raise RunError(f"{run} is a tuning folder, not a run: its runs are in {run / 'candidates'}") from None
        raise RunError(
            f"{run} is not a varprune run folder (no config.json); train one with `varprune train --out {run} ...`"
        ) from None
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}); the run folder is damaged") from None
    if isinstance(data, dict) and isinstance(data.get("model_type"), str) and "train" not in data:
        raise RunError(f"{run} is a Hugging Face model folder, not a run: {_FOLDER_ROUTE.format(folder=run)}")
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise RunError(f"{path} is not a varprune run configuration")
    try:
        cfg = TrainConfig.from_dict(data["train"])
    except RunError as e:
        raise RunError(f"{path}: {e}") from None
    # --init only seeds the first epoch: a run's checkpoint and weights are its own, so the file need not exist
    found = problems(dataclasses.replace(cfg, init=None, init_exclude=None), check_device=False)
    if found:
        raise RunError(f"{path}: " + "; ".join(found))
    return cfg


def read_resolved(run: Path) -> dict:
    """The ``resolved`` part of a run's config.json (empty if absent or unreadable)."""
    try:
        data = json.loads((Path(run) / "config.json").read_text())
        resolved = data.get("resolved", {}) if isinstance(data, dict) else {}
        return resolved if isinstance(resolved, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}
