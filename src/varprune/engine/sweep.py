"""The pruning sweep: prune one-shot -> BN re-tune -> evaluate, over pruners and sparsities, for trained runs.

Used by ``varprune prune``, ``study``, ``demo`` and ``tune``. A sweep writes RUN/prune.{json,csv,png} only; a
run's weights and checkpoint are read, never modified.

prune.json: ``metric`` (the task's primary metric; absent in files of 0.1, meaning accuracy),
``higher_is_better``, ``dense_<metric>``, ``bn_retuning`` (false for a model without BatchNorm: nothing is
re-tuned and results carry no ``<metric>_bnt``), ``pruners``, ``calibration`` (when a calibrated pruner ran:
samples and sequence length), and per result ``pruner``, ``sparsity`` (or ``pattern``), ``realised_sparsity``,
``<metric>`` (before BN re-tuning) and ``<metric>_bnt`` (after), ``skipped`` (N:M tensors left dense) and
``fallback`` (layers a calibrated pruner left to magnitude, with the reason). Tasks with several metrics also
store all of them under ``dense_metrics``, ``metrics`` and ``metrics_bnt``. With ``--choices`` (language models):
``choices`` (each task's name and the sha256 of its questions), ``dense_choices`` and per result ``choices``,
each ``{"tasks": {name: {"acc", "acc_norm", "n"}}, "mean": {"acc", "acc_norm"}}`` (engine/choices.py), measured
on the model as the result's primary metric is last measured (after BN re-tuning where there is any).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from varprune.data import dataset_info
from varprune.data.calibtext import calibration_protocol, suffix_problem
from varprune.device import autocast, resolve_device
from varprune.engine.identity import other_data_line
from varprune.engine.runconfig import load_run_config
from varprune.engine.rundir import WEIGHTS
from varprune.engine.runs import RunData, data_fingerprint
from varprune.engine.trained import check_runs, load_trained, run_label
from varprune.errors import RunError
from varprune.numerics.pruners import CALIBRATED, PRUNERS, prune_once
from varprune.numerics.pruning import (
    SCOPES,
    MagnitudePruner,
    PruningError,
    check_sparsity,
    parse_pattern,
    realised_sparsity,
    recalibrate_bn,
)
from varprune.numerics.weights import prunable_weights
from varprune.report.results import write_sweep
from varprune.report.tables import metric_info, setting_key
from varprune.storage.files import file_digest
from varprune.tasks import Task

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)
DEFAULT_CALIB_SAMPLES = 128  # the references' 128 calibration segments (images, for image models)
# magnitude pruning's scope when --scope is not given: per layer for causal LMs (the LLM references' convention,
# locuslab/wanda's magnitude baseline), global for everything else (CrAM's protocol)
DEFAULT_SCOPE = {"language-modeling": "layerwise", "instruction-tuning": "layerwise"}


def default_scope(task: str) -> str:
    """Magnitude pruning's scope for a model of ``task`` (a task name) when none is asked for."""
    return DEFAULT_SCOPE.get(task, "global")


def calibration_problems(pruners, samples, seq_len, data) -> list[str]:
    """The calibration flags' problems for ``pruners`` (the sweep's, and export's and finetune's single one)."""
    found = []
    if any(p in CALIBRATED for p in pruners):
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= 1 << 20:
            found.append(f"--calib-samples must be an integer in [1, 1048576], got {samples}")
        if seq_len is not None and not 2 <= seq_len <= 1 << 16:
            found.append(f"--calib-seq-len must be in [2, 65536], got {seq_len}")
        if data is not None and not Path(data).is_file():
            found.append(f"--calib-data {data} is not a file; give a local .txt or .jsonl file")
        elif data is not None and suffix_problem(data):
            found.append(str(suffix_problem(data)))
    # given where no calibration happens (engine.checks, the one rule; --calib-samples, whose value is never
    # None here, is judged by the commands, which see whether it was given)
    from varprune.engine.checks import Scope, flag_problems

    return found + flag_problems({"--calib-seq-len": seq_len, "--calib-data": data}, Scope(pruners=tuple(pruners)))


@dataclass(frozen=True)
class SweepSpec:
    """Everything that defines a sweep of one run (what prune.json records and a reuse compares)."""

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    patterns: tuple[str, ...] = ()
    pruners: tuple[str, ...] = ("magnitude",)
    scope: str | None = None  # None: by the task (default_scope), resolved by for_task before a sweep
    exclude: tuple[str, ...] = ()
    bnt_batches: int = 20
    bnt_batch_size: int = 500
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_seq_len: int | None = None  # text: windows of this many tokens (default: the run's --seq-len)
    calib_data: str | None = None  # language models: draw the calibration windows from this local file
    choices: tuple[str, ...] = ()  # language models: --choices files (or fortunes-endings) measured at every setting

    def __post_init__(self):
        for name in ("sparsities", "patterns", "pruners", "exclude", "choices"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def take(cls, settings: dict) -> SweepSpec:
        """A spec from the sweep's fields found in ``settings`` (a demo size's dict), removed from it."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: settings.pop(k) for k in names if k in settings})

    def for_task(self, task: str) -> SweepSpec:
        """This spec with its scope resolved for a model of ``task`` (a task name) if none was given."""
        return self if self.scope is not None else dataclasses.replace(self, scope=default_scope(task))

    @property
    def calibrated(self) -> bool:
        return any(p in CALIBRATED for p in self.pruners)

    def settings(self) -> list[tuple[str, object]]:
        """``(pruner, sparsity or pattern)`` in the order the results are written."""
        return [(p, s) for p in self.pruners for s in (*self.sparsities, *self.patterns)]

    def problems(self) -> list[str]:
        from varprune.engine.trained import bnt_problems

        found = []
        unknown = [p for p in self.pruners if p not in PRUNERS]
        if unknown or not self.pruners:
            found.append(f"--pruner(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(PRUNERS)}")
        if len(set(self.pruners)) != len(self.pruners):
            found.append(f"--pruners must not repeat, got {','.join(self.pruners)}")
        if not self.sparsities and not self.patterns:
            found.append("give --sparsities or --patterns: nothing to prune")
        if self.scope is not None and self.scope not in SCOPES:
            found.append(f"--scope {self.scope}: choose one of {', '.join(SCOPES)}")
        for s in self.sparsities:
            try:
                check_sparsity(s)
            except PruningError as e:
                found.append(str(e))
        for p in self.patterns:
            try:
                parse_pattern(p)
            except PruningError as e:
                found.append(str(e))
        found += calibration_problems(self.pruners, self.calib_samples, self.calib_seq_len, self.calib_data)
        if self.choices:
            from varprune.engine.choices import choice_problem

            problem = choice_problem(self.choices)
            if problem:
                found.append(problem)
        return found + bnt_problems(self.bnt_batches, self.bnt_batch_size)

    @functools.cached_property
    def _calib_data_digest(self) -> str:
        """The --calib-data file's sha256, read once per spec (record() is called for every run of a sweep)."""
        assert self.calib_data is not None
        return file_digest(Path(self.calib_data))

    @functools.cached_property
    def choice_sets(self) -> list:
        """The --choices sets, read once per spec (data/choices.py)."""
        from varprune.data.choices import load_choice_sets

        return load_choice_sets(self.choices)

    def record(self) -> dict:
        """The fields prune.json holds about its settings (compared by :func:`finished_sweep`)."""
        doc: dict = {
            "scope": self.scope,
            "exclude": list(self.exclude),
            "pruners": list(self.pruners),
            "bnt_batches": self.bnt_batches,
            "bnt_batch_size": self.bnt_batch_size,
        }
        if self.calibrated:
            calibration: dict = {"samples": self.calib_samples, "seq_len": self.calib_seq_len}
            if self.calib_data is not None:  # the file's bytes, so that a changed file is swept again
                calibration["data"] = {
                    "path": str(self.calib_data),
                    "sha256": self._calib_data_digest,
                    "protocol": calibration_protocol(self.calib_data),  # how windows are drawn from it
                }
            doc["calibration"] = calibration
        if self.choices:  # the questions' bytes, so that changed questions are swept again
            from varprune.engine.choices import sets_digest

            doc["choices"] = sets_digest(self.choice_sets)
        return doc


def prune_sweep(
    model: nn.Module,
    sparsities: Iterable[float] | SweepSpec,
    task: Task,
    test_loader,
    bnt: list[torch.Tensor],
    scope: str | None = None,
    exclude: Iterable[str] = (),
    amp: str = "none",
    progress=None,
    patterns: Iterable[str] = (),
    calibration: list | None = None,
    layers=None,
    measure: Callable[[nn.Module], dict] | None = None,
) -> dict:
    """Evaluate ``model`` pruned one-shot at every setting of the sweep, before and after BN re-tuning.

    ``sparsities``: a `SweepSpec` (pruners, sparsities, N:M patterns, scope...), or, as before, the
    sparsities of a magnitude sweep (with ``scope``, ``exclude`` and ``patterns``). Magnitude's unstructured
    settings share one sort of the magnitudes (MagnitudePruner); an N:M pattern keeps the N largest of every M
    consecutive weights along the input dimension (tensors whose input size is not a multiple of M stay dense,
    listed under ``skipped``). Wanda and SparseGPT prune from ``calibration`` (model inputs from the training
    split, numerics/wanda.py, numerics/sparsegpt.py). With no re-tuning batches (``bnt == []``: none asked, or
    no BatchNorm) nothing is re-tuned and the results carry no ``_bnt`` values. The model is restored to its
    dense state afterwards. Returns the ``prune.json`` document; each row records the seconds its pruning took
    (``prune_s``) and a magnitude row its ``scope``.

    ``progress(pruner, setting, before, after, seconds, choices)``: called after each setting;
    ``layers(pruner, setting)``: before each setting, a callback for the calibrated pruners to call with each
    layer's name as they prune it (a progress bar), or None; it is called with None once the setting is done.
    ``measure``: a second measurement of the model, made after the primary metric at every setting and on the
    dense model (``--choices``: engine/choices.py), stored under ``choices`` and ``dense_choices``.
    """
    spec = (
        sparsities
        if isinstance(sparsities, SweepSpec)
        else SweepSpec(tuple(sparsities), tuple(patterns), ("magnitude",), scope, tuple(exclude))
    ).for_task(task.name)
    scope = spec.scope or default_scope(task.name)  # for_task resolved it
    if spec.calibrated and not calibration:
        raise RunError("Wanda and SparseGPT need calibration inputs (--calib-samples)")
    m = task.primary
    several = len(task.metric_names) > 1
    retune = bool(bnt)
    dense_state = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    dense = task.evaluate(model, test_loader, amp)
    dense_extra = measure(model) if measure is not None else None
    magnitude = (
        MagnitudePruner(model, scope, spec.exclude) if "magnitude" in spec.pruners and spec.sparsities else None
    )  # one sort for every sparsity
    results: list[dict] = []
    prune_time = {p: 0.0 for p in spec.pruners}
    bnt_time = 0.0
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    try:
        for pruner, setting in spec.settings():
            model.load_state_dict(dense_state)
            sync()
            t = time.perf_counter()
            each = layers(pruner, setting) if layers is not None else None
            masks, skipped, fallback = prune_once(
                model, pruner, setting, scope, spec.exclude, calibration, magnitude, progress=each
            )
            sync()
            took = time.perf_counter() - t
            if each is not None:
                each(None)
            prune_time[pruner] += took
            before = task.evaluate(model, test_loader, amp)
            after = before
            if retune:
                t = time.perf_counter()
                with autocast(bnt[0].device, amp):
                    recalibrate_bn(model, bnt)
                sync()
                bnt_time += time.perf_counter() - t
                after = task.evaluate(model, test_loader, amp)
            realised = realised_sparsity(masks)
            row: dict = {"pruner": pruner, **({"scope": scope} if pruner == "magnitude" else {})}
            if isinstance(setting, str):
                row.update(
                    {"pattern": setting, "sparsity": realised, "realised_sparsity": realised, "skipped": skipped}
                )
            else:
                row.update({"sparsity": setting, "realised_sparsity": realised})
            row[m] = before[m]
            if retune:
                row[f"{m}_bnt"] = after[m]
            if fallback:
                row["fallback"] = fallback
            row["prune_s"] = took
            if measure is not None:
                row["choices"] = measure(model)
            if several:
                row["metrics"] = before
                if retune:
                    row["metrics_bnt"] = after
            results.append(row)
            if progress is not None:
                progress(pruner, setting, before[m], after[m] if retune else None, took, row.get("choices"))
    finally:
        model.load_state_dict(dense_state)
    doc: dict = {} if m == "accuracy" else {"metric": m}
    doc.update(
        {
            "higher_is_better": task.higher_is_better,
            f"dense_{m}": dense[m],
            "bn_retuning": retune,
            **spec.record(),
            "results": results,
            "timing": {
                "total_s": time.perf_counter() - t0,
                "prune_s": sum(prune_time.values()),
                "prune_s_by_pruner": prune_time,
                "bnt_s": bnt_time,
            },
        }
    )
    if not retune:
        doc["bn_retuning_note"] = (
            "not applicable: the model has no BatchNorm"
            if not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
            else "skipped (--bnt-batches 0)"
        )
    if several:
        doc["dense_metrics"] = dense
    if dense_extra is not None:
        doc["dense_choices"] = dense_extra
    return doc


# ---------------------------------------------------------------- run folders


def reusable_sweep(folder: Path, spec: SweepSpec, same: dict, other_data: bool = False) -> dict | None:
    """FOLDER/prune.json if it holds exactly ``spec``'s settings (its scope resolved), every key of ``same`` has
    the value given (what was pruned and on which data), and its plot and table exist (a sweep interrupted
    between the files is redone): the one reuse rule, for a run's sweep and a model folder's alike. One made on
    other text (``--other-data``) is reused only with ``other_data``."""
    try:
        doc = json.loads((folder / "prune.json").read_text())
        recorded = {k: doc.get(k) for k in spec.record()}
        recorded["pruners"] = doc.get("pruners", ["magnitude"])  # files of 0.2: magnitude only
        found = (
            [setting_key(r) for r in doc["results"]] == [(p, s) for p, s in spec.settings()]
            and recorded == spec.record()
            and all(doc.get(k) == v for k, v in same.items())
            and (folder / "prune.png").is_file()
            and (folder / "prune.csv").is_file()
            and (other_data or not doc.get("other_data"))
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return None
    return doc if found else None


def finished_sweep(run: Path, spec: SweepSpec, data: dict | None = None, other_data: bool = False) -> dict | None:
    """RUN/prune.json if it was made from RUN's current weights with exactly these settings, on the same data
    (``data``: :func:`~varprune.engine.runs.data_fingerprint`; None: the run's own): :func:`reusable_sweep`. A
    spec without a scope takes the default of the run's task (what a sweep of it records)."""
    try:
        cfg = load_run_config(run)
        same = {
            "weights_sha256": file_digest(run / WEIGHTS),
            "data": data if data is not None else data_fingerprint(cfg),
        }
        if spec.scope is None:
            spec = spec.for_task(dataset_info(cfg.dataset).task)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return None
    return reusable_sweep(run, spec, same, other_data)


def _where(setting) -> str:
    return setting if isinstance(setting, str) else f"{100 * setting:g}%"


def _say(log, metric: str, scope: str = "global"):
    """One line per setting once it is measured: the metric, and how long the pruning took."""
    shown = metric_info(metric)

    def progress(pruner, setting, before, after, seconds=None, choices=None):
        unit = "%" if shown.percent else ""
        name = f"{pruner} ({scope})" if pruner == "magnitude" else pruner
        text = f"  {name} {_where(setting)}: {metric} {shown.fmt(after if after is not None else before)}{unit}"
        text += f" with BNT, {shown.fmt(before)}{unit} without" if after is not None else ""
        if choices:
            text += f"; choices acc {100 * choices['mean']['acc']:.2f}%"
        log(text + (f"; pruned in {seconds:.1f} s" if seconds is not None else ""))

    return progress


class LayerProgress:
    """The calibrated pruners' progress through a model, for one setting at a time: on a terminal a bar over the
    layers with an ETA (as the training loop's); otherwise one line per block of the model's block stack (a
    transformer's layers) with the time so far and an estimate of the time left, or, for a model without one, a
    line at every tenth of its layers (a log file gets tens of lines, not hundreds)."""

    def __init__(self, model: nn.Module, exclude=(), log=print, tty: bool | None = None):
        import sys

        from varprune.numerics.calibration import find_block_stack

        names = [n for n, _ in prunable_weights(model, exclude)]
        self.total, self.log = len(names), log
        self.tty = sys.stderr.isatty() if tty is None else tty
        stack = find_block_stack(model, names)
        prefixes = stack[2] if stack is not None else []
        # the layer whose pruning completes each block: a line after it (non-terminal output)
        self.block_of = {}
        for i, prefix in enumerate(prefixes):
            inside = [n for n in names if n.startswith(prefix)]
            if inside:
                self.block_of[inside[-1]] = i + 1
        self.blocks = len(prefixes)
        self.bar = None

    def __call__(self, pruner: str, setting):
        if pruner not in CALIBRATED or self.total == 0:
            return None
        done, start, desc = [0], time.perf_counter(), f"  {pruner} {_where(setting)}"
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit="layer", leave=False, dynamic_ncols=True)
        step = max(1, -(-self.total // 10))

        def each(name):
            if name is None:  # the setting is done
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None
                return
            done[0] += 1
            if self.bar is not None:
                self.bar.update()
                return
            spent = time.perf_counter() - start
            left = spent * (self.total - done[0]) / done[0]
            if self.blocks and name in self.block_of:
                self.log(f"{desc}: block {self.block_of[name]}/{self.blocks} pruned, {spent:.0f} s, ~{left:.0f} s left")
            elif not self.blocks and (done[0] % step == 0 or done[0] == self.total):
                self.log(f"{desc}: {done[0]}/{self.total} layers pruned, {spent:.0f} s, ~{left:.0f} s left")

        return each


def prune_runs(
    runs: list[Path],
    spec: SweepSpec | None = None,
    data_dir=None,
    device="auto",
    log=print,
    reuse=False,
    other_data: bool | None = None,
) -> list[tuple[str, dict]]:
    """Sweep every run; write RUN/prune.{json,csv,png}; return (label, document) pairs.

    ``reuse``: a run whose prune.json was made from its current weights with
    the same settings is not swept again (an interrupted sweep resumes).
    ``other_data`` (``prune --other-data``): measure on text other than the run's (recorded as prune.json's
    ``other_data``); without it such a ``data_dir`` is refused (engine/identity.py; None: the caller, a study or
    demo, has no such flag).
    """
    spec = spec or SweepSpec()
    dev = resolve_device(device)
    configs, found = check_runs(runs, data_dir)  # every folder checked before any work
    found += spec.problems()
    found += choices_run_problems(runs, spec)
    if found:
        raise RunError("; ".join(found))
    cache: dict[tuple, RunData] = {}  # load_trained's data cache: runs on the same data share it
    out = []
    labels = [run_label(c) for c in configs]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in runs]
    asked = spec
    for run, cfg, label in zip(runs, configs, labels):
        fingerprint = data_fingerprint(cfg)  # check_runs set cfg.data_dir to --data-dir
        spec = asked.for_task(dataset_info(cfg.dataset).task)
        done = finished_sweep(run, spec, fingerprint, bool(other_data)) if reuse else None
        if done is not None:
            log(f"reusing {run / 'prune.json'} (same weights and settings; --force sweeps again)")
            done["label"] = label
            out.append((label, done))
            continue
        digest = file_digest(run / WEIGHTS)
        t = load_trained(run, cfg, str(dev), cache, other_data)
        if t.other_data is not None:
            log(other_data_line(str(run), t.other_data))
        log(f"pruning {run} ({label})")
        calibration = (
            t.calibration(spec.calib_samples, spec.calib_seq_len, spec.calib_data) if spec.calibrated else None
        )
        doc = prune_sweep(
            t.model,
            spec,
            t.task,
            t.data.test_loader,
            t.bnt(spec.bnt_batches, spec.bnt_batch_size),
            amp=t.amp,
            progress=_say(log, t.task.primary, spec.scope or "global"),
            calibration=calibration,
            layers=LayerProgress(t.model, spec.exclude, log),
            measure=_choices_measure(spec, t),
        )
        doc.update({"run": str(run), "label": label, "weights_sha256": digest, "data": fingerprint})
        if t.other_data is not None:
            doc["other_data"] = t.other_data
        if spec.calibrated and t.is_text:
            doc["calibration_seq_len"] = spec.calib_seq_len or t.cfg.seq_len  # what the default resolved to
        write_sweep(run, doc, label)
        out.append((label, doc))
    return out


def choices_run_problems(runs: list[Path], spec: SweepSpec) -> list[str]:
    """With ``--choices``, every run must be a language model (checked before any work)."""
    from varprune.engine.choices import choices_task_problem
    from varprune.engine.runconfig import read_resolved

    found = [choices_task_problem(str(run), read_resolved(run).get("task")) for run in runs] if spec.choices else []
    return [p for p in found if p]


def _choices_measure(spec: SweepSpec, t) -> Callable[[nn.Module], dict] | None:
    """The sweep's ``--choices`` measurement of a loaded run, or None; a run that is no language model is refused."""
    if not spec.choices:
        return None
    from varprune.engine.choices import choice_results, choices_task_problem, model_positions

    problem = choices_task_problem(str(t.run), t.task.name)
    if problem or t.data.tokenizer is None:
        raise RunError(problem or f"{t.run} has no tokenizer; --choices scores language models")

    sets, positions = spec.choice_sets, model_positions(t.model, t.cfg.seq_len)
    return lambda model: choice_results(model, t.data.tokenizer, sets, positions, amp=t.amp)
