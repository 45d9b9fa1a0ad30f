"""Studies: several methods x several seeds, trained, pruned and summarised.

A study folder holds ``study.json`` (the resolved study configuration),
``runs/METHOD-sSEED/`` (ordinary run folders), and the report:
``report.md`` (mean and standard deviation per method and sparsity, after and
before BN re-tuning, and training time per epoch relative to SGD measured in
this study), ``report.json`` (every number) and ``report.png`` (a band per
method). Finished runs and their sweeps are reused; interrupted runs resume.

Under torchrun (``torchrun --nproc-per-node N -m varprune study ...``) every
training runs data-parallel on all N processes; rank 0 alone writes the study
folder and then prunes, analyses and reports while the others exit.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from varprune.engine.checks import problems
from varprune.engine.config import LOCATION_KEYS, TrainConfig
from varprune.engine.progress import Progress, Step, training_cost
from varprune.engine.rundir import METRICS, path_problem, read_metrics
from varprune.engine.sweep import SweepSpec, finished_sweep, prune_runs
from varprune.engine.trained import ensure_run
from varprune.errors import RunError
from varprune.storage.files import OutputFolder

STUDY_FILES = ("study.json", "report.json", "report.md", "report.png", "report.html")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def epoch_time(run: Path) -> float:
    """Median training time per epoch (the median ignores the first epoch's warm-up)."""
    times = []
    for m in read_metrics(run):
        t = m.get("epoch_time_s")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise RunError(
                f"{run / METRICS} line {m['epoch']} has no valid epoch_time_s (damaged or edited); "
                f"`varprune train --resume {run}` rewrites it from the run's checkpoint"
            )
        times.append(t)
    return statistics.median(times)


def _comparable(train: dict) -> dict:
    return {k: v for k, v in train.items() if k not in LOCATION_KEYS}


def run_study(
    out: Path,
    base: TrainConfig,
    methods: list[str],
    seeds: list[int],
    spec: SweepSpec | None = None,
    progress: bool = True,
    log=print,
    analysis: bool = True,
    html: bool = True,
    overwrite: bool = False,
    baseline: str | None = None,
) -> dict:
    """Train every (method, seed) of the study in ``out/runs``, sweep each with ``spec`` (pruners, sparsities,
    patterns), and write the report: means with 95% intervals over seeds and paired tests against ``baseline``
    (default: the first method). Returns report.json's document."""
    from varprune.engine import distributed
    from varprune.report.figures import study_plot
    from varprune.report.summary import summarize
    from varprune.report.tables import study_table

    spec = spec or SweepSpec()
    baseline = baseline or (methods[0] if methods else None)
    distributed.setup(base.device)  # joins the torchrun job, if any
    if not distributed.is_main():
        log, progress = (lambda *a, **k: None), False
    configs = {}
    found = spec.problems()
    bad_out = path_problem(out)
    if bad_out:
        found.append(bad_out)
    for method in methods:
        for seed in seeds:
            cfg = dataclasses.replace(base, method=method, seed=seed)
            found += [p for p in problems(cfg) if p not in found]
            configs[(method, seed)] = cfg
    if spec.choices:  # before any training: the study's runs must be language models
        from varprune.data.base import DatasetError
        from varprune.data.registry import dataset_info
        from varprune.engine.choices import choices_task_problem

        try:
            problem = choices_task_problem(f"--dataset {base.dataset}", dataset_info(base.dataset).task)
        except DatasetError:
            problem = None  # an unknown dataset: problems(cfg) says so
        if problem:
            found.append(problem)
    if not methods or not seeds:
        found.append("a study needs at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        found.append("--methods and --seeds must not repeat")
    if baseline is not None and baseline not in methods:
        found.append(f"--baseline {baseline} is not one of --methods {','.join(methods)}")
    folder = OutputFolder(out, "study", overwrite=overwrite, legacy=("study.json", ("methods", "seeds", "train")))
    if not found and distributed.is_main():
        try:  # before any work: a study never replaces a file it did not write
            folder.check(STUDY_FILES)
        except RunError as e:
            found.append(str(e))
    if found:
        raise RunError("; ".join(found))
    from varprune.data import dataset_info

    spec = spec.for_task(dataset_info(base.dataset).task)  # magnitude's default scope for the model's task

    study = {
        "methods": methods,
        "seeds": seeds,
        "sparsities": list(spec.sparsities),
        "patterns": list(spec.patterns),
        "pruners": list(spec.pruners),
        "scope": spec.scope,
        "bnt_batches": spec.bnt_batches,
        "bnt_batch_size": spec.bnt_batch_size,
        "calib_samples": spec.calib_samples,
        "calib_seq_len": spec.calib_seq_len,
        "train": base.to_dict(),
    }
    if spec.choices:
        study["choices"] = [s.name for s in spec.choice_sets]
    distributed.from_main(lambda: _write_spec(folder, study))  # rank 0 owns the study folder

    runs = {key: out / "runs" / f"{key[0]}-s{key[1]}" for key in configs}
    steps = [Step(f"training {runs[key]}", "train", training_cost(cfg)) for key, cfg in configs.items()]
    steps.append(Step(f"pruning {len(runs)} runs", "prune", float(len(runs))))
    if analysis:  # sized to the first seed's runs' own training, at most its cost again (below)
        analyzed = [training_cost(configs[(meth, seeds[0])]) for meth in methods]
        steps.append(Step(f"analysing {len(methods)} runs", "analyze", sum(analyzed) / 2))
    tracker = Progress("study", steps, log)
    for i, (key, cfg) in enumerate(configs.items()):
        tracker.begin(i)
        done = ensure_run(cfg, runs[key], log=log, progress=progress)
        tracker.end(i, reused=done == "reused")
    if not distributed.is_main():
        return {}  # the sweeps, analysis and report run on rank 0 alone
    distributed.alone()  # the others wait in shutdown's barrier: no collective from here on

    tracker.begin(len(configs))
    docs = {}
    todo = []
    for key, run in runs.items():
        doc = finished_sweep(run, spec)
        if doc is None:
            todo.append(key)
        else:
            docs[key] = doc
    if todo:
        swept = prune_runs([runs[k] for k in todo], spec, device=base.device, log=log)
        docs.update({k: doc for k, (_, doc) in zip(todo, swept)})
    tracker.end(len(configs), reused=not todo)

    times = {meth: statistics.fmean(epoch_time(runs[(meth, s)]) for s in seeds) for meth in methods}
    summary = summarize(study, docs, times, baseline)
    table = study_table(summary)
    folder.write_text("report.json", json.dumps(summary, indent=2) + "\n")
    folder.write_text("report.md", table)
    study_plot(summary, out / "report.png")
    folder.record("report.png")
    print(table)
    written = [out / "report.md", out / "report.png", out / "report.json"]
    if analysis:  # the first seed of every method: distributions, sensitivity, flatness
        from varprune.engine.analyze import analyze_runs

        first = [runs[(meth, seeds[0])] for meth in methods]
        tracker.begin(len(configs) + 1)
        reused = _analysis_done(out / "analysis", first)
        if not reused:
            # sized to the runs' own training (at most its cost again), so a small study stays small
            t0 = time.perf_counter()
            analyze_runs(
                first,
                out / "analysis",
                device=base.device,
                bnt_batches=spec.bnt_batches,
                bnt_batch_size=spec.bnt_batch_size,
                log=log,
                overwrite=overwrite,
                budget=1.0,
            )
            log(f"analysis took {time.perf_counter() - t0:.0f} s (--no-analysis skips it)")
        tracker.end(len(configs) + 1, reused=reused)
        written.append(out / "analysis" / "analysis.json")
    if html:
        from varprune.report.pages import study_html

        written.append(Path(study_html(out, out / "report.html")))
        folder.record("report.html")
    log("report: " + ", ".join(map(str, written)))
    tracker.finish()
    return summary


def _write_spec(folder: OutputFolder, spec: dict) -> None:
    folder.mkdir()
    spec_path = folder.path / "study.json"
    if spec_path.exists():
        try:
            old = json.loads(spec_path.read_text())
            # through TrainConfig: a field added since the study began takes its default on both sides
            same = _comparable(TrainConfig.from_dict(old["train"]).to_dict()) == _comparable(spec["train"])
        except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
            raise RunError(f"{spec_path} is damaged; remove it or choose another --out") from None
        if not same:
            raise RunError(f"{folder.path} holds a study with another training configuration; choose another --out")
    folder.write_text("study.json", json.dumps(spec, indent=2) + "\n")


def _analysis_done(folder: Path, runs: list[Path]) -> bool:
    """An analysis of exactly these runs, newer than their weights, is reused."""
    try:
        doc = json.loads((folder / "analysis.json").read_text())
        mine = sorted(str(r) for r in runs) == sorted(e["run"] for e in doc["runs"].values())
        newer = all(
            (folder / "analysis.json").stat().st_mtime >= (r / "model.safetensors").stat().st_mtime for r in runs
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return mine and newer
