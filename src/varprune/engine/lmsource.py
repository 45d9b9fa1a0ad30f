"""The language model behind a path, in memory, for the accuracy measurements of ``evaluate`` (``--choices``,
``--lm-eval``): a run folder (its final weights, dense or pruned one-shot at one setting exactly as ``export``
prunes, without writing anything), a file written by ``varprune export``, a Hugging Face model folder written
by ``varprune export --format hf``, or ``hf:DIR`` (any Hugging Face causal-LM folder with its tokenizer.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from varprune.device import resolve_amp, resolve_device
from varprune.errors import RunError


@dataclass
class LanguageModel:
    """A causal language model ready to score: its module (eval mode, on ``device``), its tokenizer, the
    positions it reads, the mixed precision it is measured in, and where it came from."""

    model: nn.Module
    tokenizer: object
    positions: int
    device: torch.device
    amp: str
    source: str
    setting: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PruneSetting:
    """One one-shot pruning of a run: ``sparsity`` (unstructured) or ``pattern`` ("N:M"), and the pruner."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    pruner: str = "magnitude"
    scope: str | None = None  # magnitude's scope; None: the task's default (engine.sweep.default_scope)
    calib_samples: int = 128
    calib_seq_len: int | None = None
    calib_data: str | None = None

    @property
    def dense(self) -> bool:
        return self.sparsity is None and self.pattern == "unstructured"


def _kind(path: Path) -> str:
    """``run``, ``file`` (an exported model) or ``folder`` (a Hugging Face model folder)."""
    if path.is_file():
        return "file"
    if not path.is_dir():
        raise RunError(f"{path} does not exist; give a run folder, a file of `varprune export` or a model folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise RunError(
            f"{path} has no readable config.json: it is neither a run folder nor a Hugging Face model folder"
        ) from None
    return "run" if isinstance(config, dict) and "train" in config else "folder"


def open_language_model(
    path: Path | str, device: str = "auto", setting: PruneSetting | None = None, data_dir: str | None = None
) -> LanguageModel:
    """Load ``path`` (see the module docstring) as a :class:`LanguageModel`; ``setting`` prunes a run."""
    from varprune.engine.choices import model_positions

    setting = setting or PruneSetting()
    if str(path).startswith("hf:"):  # a Hugging Face causal-LM folder as it is (engine/commonsense.py loads it)
        from varprune.engine.commonsense import load_for_generation

        if not setting.dense:
            raise RunError(f"--sparsity and --pattern prune a run folder; {path} is a model folder: drop them")
        model, tokenizer, dev, amp = load_for_generation(str(path), device)
        return LanguageModel(model, tokenizer, model_positions(model), dev, amp, str(path))
    path = Path(path)
    kind = _kind(path)
    if kind == "file" and not setting.dense:
        raise RunError(
            f"--sparsity and --pattern prune a run folder; {path} is an exported model, already pruned: drop them"
        )
    if kind == "folder" and not setting.dense:  # a folder may be dense (save_pretrained): not "already pruned"
        raise RunError(
            f"--sparsity and --pattern prune a run folder, not a model folder such as {path}: prune it with "
            f"`varprune export --model hf:{path} --dataset D --sparsity S --format hf --out DIR`, then score DIR"
        )
    dev = resolve_device(device)
    if kind == "run":
        return _from_run(path, dev, setting, data_dir)
    if kind == "file":
        from varprune.data.tokenizer import tokenizer_from_json
        from varprune.storage.pruned_format import load_pruned, read_pruned_metadata

        meta = read_pruned_metadata(path)
        if "tokenizer_json" not in meta or meta.get("dataset", {}).get("task") != "language-modeling":
            raise RunError(f"{path} is not an exported language model (no tokenizer, or another task)")
        tokenizer = tokenizer_from_json(
            meta["tokenizer_json"], json.loads(meta.get("tokenizer_pad_id", "null")), str(path)
        )
        train = json.loads(meta.get("train_config", "{}"))
        model = load_pruned(path, dev).eval()
        amp = resolve_amp(train.get("amp", "none"), dev)
        return LanguageModel(model, tokenizer, model_positions(model, train.get("seq_len")), dev, amp, str(path))
    from varprune.data.tokenizer import load_tokenizer
    from varprune.storage.hf_folder import load_hf_folder

    if not (path / "tokenizer.json").is_file():
        raise RunError(f"{path} has no tokenizer.json; a model folder needs its tokenizer to be scored")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    model = load_hf_folder(path, task="language-modeling").to(dev).eval()
    return LanguageModel(model, tokenizer, model_positions(model), dev, "none", str(path))


def _from_run(run: Path, dev: torch.device, setting: PruneSetting, data_dir: str | None) -> LanguageModel:
    from varprune.engine.choices import choices_task_problem, model_positions
    from varprune.engine.runconfig import read_resolved
    from varprune.engine.trained import check_runs, load_trained
    from varprune.numerics.pruners import prune_once

    configs, found = check_runs([run], data_dir)
    problem = choices_task_problem(str(run), read_resolved(run).get("task"))
    if problem:
        found.insert(0, problem)
    if found:
        raise RunError("; ".join(found))
    t = load_trained(run, configs[0], str(dev))
    problem = choices_task_problem(str(run), t.task.name)
    if problem or t.data.tokenizer is None:
        raise RunError(problem or f"{run} has no tokenizer; --choices and --lm-eval score language models")
    done: dict = {}
    if not setting.dense:
        calibration = (
            t.calibration(setting.calib_samples, setting.calib_seq_len, setting.calib_data)
            if setting.pruner != "magnitude"
            else None
        )
        chosen = setting.pattern if setting.pattern != "unstructured" else setting.sparsity
        from varprune.engine.sweep import default_scope

        scope = setting.scope or default_scope(t.task.name)
        masks, _, _ = prune_once(t.model, setting.pruner, chosen, scope, (), calibration)
        from varprune.numerics.pruning import realised_sparsity

        done = {
            "pruner": setting.pruner,
            "setting": chosen,
            "scope": scope,
            "realised_sparsity": realised_sparsity(masks),
        }
    t.model.eval()
    return LanguageModel(t.model, t.data.tokenizer, model_positions(t.model, t.cfg.seq_len), dev, t.amp, str(run), done)
