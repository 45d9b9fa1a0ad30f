"""Results files: prune.json (with prune.csv and prune.png beside it) and a study's report.json.

Written here and read back here, checked: a missing, damaged or edited file is one :class:`RunError` line
naming the file and the fix. Nothing here trains or loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from varprune.errors import RunError
from varprune.report.figures import sweep_plot
from varprune.report.tables import METRICS, metric_info, metric_of, study_table, sweep_csv
from varprune.storage.files import atomic_write_text


def write_sweep(run: Path, doc: dict, label: str) -> None:
    """prune.json, prune.csv and prune.png beside a run's weights."""
    import json

    atomic_write_text(run / "prune.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(run / "prune.csv", sweep_csv(doc))
    sweep_plot([(label, doc)], run / "prune.png", title=f"{label}: one-shot magnitude pruning")


def _prune_json_problem(doc) -> str | None:
    """The first field of a prune.json document that is missing, of the wrong type or out of range."""
    if not isinstance(doc, dict):
        return "it is not a JSON object"
    m = metric_of(doc)
    if not isinstance(m, str) or m not in METRICS:
        return f"metric {str(m)[:30]!r} is not one varprune writes ({', '.join(METRICS)})"
    info = metric_info(m)
    if not isinstance(doc.get("label", ""), str):
        return "label is not a string"
    if not info.valid(doc.get(f"dense_{m}")):
        return f"dense_{m} is {str(doc.get(f'dense_{m}'))[:30]}, outside [{info.lo:g}, {info.hi:g}]"
    results = doc.get("results")
    if not isinstance(results, list) or not results:
        return "results is not a non-empty list"
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            return f"results[{i}] is not an object"
        s = r.get("sparsity")
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1):
            return f"results[{i}].sparsity is {str(s)[:30]}, outside [0, 1)"
        rs = r.get("realised_sparsity", s)
        if not (isinstance(rs, (int, float)) and not isinstance(rs, bool) and 0 <= rs <= 1):
            return f"results[{i}].realised_sparsity is {str(rs)[:30]}, outside [0, 1]"
        for key in (m, f"{m}_bnt"):
            if (key in r or key == m) and not info.valid(r.get(key)):
                return f"results[{i}].{key} is {str(r.get(key))[:30]}, outside [{info.lo:g}, {info.hi:g}]"
    if "dense_choices" in doc:  # --choices: the dense model's and every result's, over the same tasks
        tasks = doc["dense_choices"].get("tasks") if isinstance(doc["dense_choices"], dict) else None
        problem = choices_problem(doc["dense_choices"], tasks)
        if problem:
            return f"dense_choices: {problem}"
        for i, r in enumerate(results):
            problem = choices_problem(r.get("choices"), tasks)
            if problem:
                return f"results[{i}].choices: {problem}"
    elif any(isinstance(r, dict) and "choices" in r for r in results):
        return "results hold choices but dense_choices is missing"
    return None


def _fraction(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1


def choices_problem(c, tasks) -> str | None:
    """What is wrong with a ``--choices`` result ``{"tasks": {name: {"acc", "acc_norm", "n"}}, "mean": {...}}``
    (the tasks those of ``tasks``), or None."""
    if not isinstance(c, dict) or not isinstance(c.get("tasks"), dict) or not c["tasks"]:
        return "not an object with tasks"
    if isinstance(tasks, dict) and list(c["tasks"]) != list(tasks):
        return f"tasks {', '.join(map(str, c['tasks']))[:60]} are not the dense model's"
    for name, t in c["tasks"].items():
        if not isinstance(t, dict) or not all(_fraction(t.get(k)) for k in ("acc", "acc_norm")):
            return f"{str(name)[:30]}: acc and acc_norm must be in [0, 1]"
        n = t.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return f"{str(name)[:30]}: n is {str(n)[:30]}, not a positive integer"
    mean = c.get("mean")
    if not isinstance(mean, dict) or not all(_fraction(mean.get(k)) for k in ("acc", "acc_norm")):
        return "mean: acc and acc_norm must be in [0, 1]"
    return None


def read_prune_json(run: Path, allow_stale: bool = False) -> dict:
    """RUN/prune.json, checked: missing, unreadable, damaged, edited out of range, or made from other weights
    than RUN's current model.safetensors (unless ``allow_stale``) is a RunError naming the file and the fix."""
    path = run / "prune.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        if (run / "study.json").is_file():
            raise RunError(
                f"{run} is a study folder: `varprune report {run}` reports it (its runs are in {run / 'runs'})"
            ) from None
        if (run / "tune.json").is_file():
            raise RunError(
                f"{run} is a tuning folder, not a run: its runs are in {run / 'candidates'}; "
                f"`varprune report RUN` takes those"
            ) from None
        raise RunError(f"{path} not found: run `varprune prune {run}` first") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(
            f"cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__}); check its "
            f"permissions, or rerun `varprune prune {run}`"
        ) from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise RunError(f"{path} is not valid JSON (damaged or edited); rerun `varprune prune {run}`") from None
    problem = _prune_json_problem(doc)
    if problem is not None:
        raise RunError(f"{path}: {problem} (damaged or edited); rerun `varprune prune {run}`")
    if not allow_stale:
        stale = _stale(run, doc)
        if stale:
            raise RunError(stale)
    return doc


def _stale(run: Path, doc: dict) -> str | None:
    """Why prune.json no longer describes RUN's weights (they were retrained or replaced since), or None."""
    from varprune.storage.files import file_digest

    recorded = doc.get("weights_sha256")
    weights = run / "model.safetensors"
    if not isinstance(recorded, str) or not weights.is_file():
        return None  # a prune.json without its run (copied alone) or of 0.1: nothing to compare
    if file_digest(weights) != recorded:
        return (
            f"{run / 'prune.json'} was made from other weights than {weights} (the run was retrained or its "
            f"weights replaced since): rerun `varprune prune {run}`, or pass --allow-stale to report it anyway"
        )
    return None


def read_study_report(study: Path) -> dict:
    """STUDY/report.json and its table, checked by rendering it: a damaged or edited file is a RunError."""
    path = study / "report.json"
    try:
        summary = json.loads(path.read_text())
        spec = summary["study"]
        ok = (
            isinstance(summary["methods"], dict)
            and bool(summary["methods"])
            and all(isinstance(spec[k], list) for k in ("methods", "seeds", "sparsities"))
            and isinstance(spec["train"], dict)
            and all(k in spec["train"] for k in ("model", "dataset", "epochs"))
            and all(k in spec for k in ("scope", "bnt_batches", "bnt_batch_size"))
        )
        table = study_table(summary) if ok else ""
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise RunError(
            f"{path} is not a varprune study report (damaged or edited); run the same "
            f"`varprune study --out {study} ...` again to rewrite it"
        )
    return {"summary": summary, "table": table}
