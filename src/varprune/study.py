"""Studies: several methods x several seeds, trained, pruned and summarised.

A study folder holds ``study.json`` (the resolved study configuration),
``runs/METHOD-sSEED/`` (ordinary run folders), and the report:
``report.md`` (mean and standard deviation per method and sparsity, after and
before BN re-tuning, and training time per epoch relative to SGD measured in
this study), ``report.json`` (every number) and ``report.png`` (a band per
method). Finished runs and their sweeps are reused; interrupted runs resume.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from .checkpoint import atomic_write_text
from .train import CHECKPOINT, WEIGHTS, RunError, TrainConfig, load_run_config, train, validate_config


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _epoch_time(run: Path) -> float:
    """Median training time per epoch (the median ignores the first epoch's warm-up)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(m["epoch_time_s"] for m in lines)


def _comparable(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device",)}


def run_study(out: Path, base: TrainConfig, methods: list[str], seeds: list[int], sparsities: list[float],
              scope: str = "global", bnt_batches: int = 20, bnt_batch_size: int = 500, progress: bool = True,
              log=print) -> dict:
    from .cli import prune_runs
    from .report import study_plot, study_table

    configs = {}
    problems = []
    for method in methods:
        for seed in seeds:
            cfg = dataclasses.replace(base, method=method, seed=seed)
            problems += [p for p in validate_config(cfg) if p not in problems]
            configs[(method, seed)] = cfg
    if not methods or not seeds:
        problems.append("a study needs at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        problems.append("--methods and --seeds must not repeat")
    if problems:
        raise RunError("; ".join(problems))

    out.mkdir(parents=True, exist_ok=True)
    spec = {"methods": methods, "seeds": seeds, "sparsities": sparsities, "scope": scope,
            "bnt_batches": bnt_batches, "bnt_batch_size": bnt_batch_size, "train": dataclasses.asdict(base)}
    spec_path = out / "study.json"
    if spec_path.exists():
        try:
            old = json.loads(spec_path.read_text())
        except ValueError:
            raise RunError(f"{spec_path} is damaged; remove it or choose another --out") from None
        if {k: v for k, v in old.get("train", {}).items() if k != "device"} != \
                {k: v for k, v in spec["train"].items() if k != "device"}:
            raise RunError(f"{out} holds a study with another training configuration; choose another --out")
    atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")

    runs = {}
    for (method, seed), cfg in configs.items():
        run = out / "runs" / f"{method}-s{seed}"
        runs[(method, seed)] = run
        if (run / "config.json").exists():
            if _comparable(load_run_config(run)) != _comparable(cfg):
                raise RunError(f"{run} was trained with another configuration; choose another --out")
            if (run / WEIGHTS).exists():
                log(f"reusing {run}")
                continue
            log(f"resuming {run}")
            train(cfg, run, resume=(run / CHECKPOINT).exists(), overwrite=True, log=log, progress=progress)
        else:
            log(f"training {method} seed {seed} -> {run}")
            train(cfg, run, log=log, progress=progress)

    docs = {}
    todo = []
    for key, run in runs.items():
        doc = _existing_sweep(run, sparsities, scope, bnt_batches, bnt_batch_size)
        if doc is None:
            todo.append(key)
        else:
            docs[key] = doc
    if todo:
        swept = prune_runs([runs[k] for k in todo], sparsities, scope, (), bnt_batches, bnt_batch_size,
                           device=base.device, log=log)
        docs.update({k: doc for k, (_, doc) in zip(todo, swept)})

    times = {m: statistics.fmean(_epoch_time(runs[(m, s)]) for s in seeds) for m in methods}
    summary = {"study": spec, "methods": {}}
    for m in methods:
        per_seed = [docs[(m, s)] for s in seeds]
        entry = {"dense": _mean_std([d["dense_accuracy"] for d in per_seed]), "epoch_time_s": times[m],
                 "time_vs_sgd": times[m] / times["sgd"] if "sgd" in times else None, "sparsities": {}}
        for i, s in enumerate(sparsities):
            entry["sparsities"][str(s)] = {
                "accuracy_bnt": _mean_std([d["results"][i]["accuracy_bnt"] for d in per_seed]),
                "accuracy": _mean_std([d["results"][i]["accuracy"] for d in per_seed]),
                "per_seed_bnt": [d["results"][i]["accuracy_bnt"] for d in per_seed],
                "per_seed": [d["results"][i]["accuracy"] for d in per_seed]}
        summary["methods"][m] = entry
    table = study_table(summary)
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", table)
    study_plot(summary, out / "report.png")
    print(table)
    log(f"report: {out / 'report.md'}, {out / 'report.png'}, {out / 'report.json'}")
    return summary


def _existing_sweep(run: Path, sparsities, scope, bnt_batches, bnt_batch_size) -> dict | None:
    """A run's prune.json, if it was made with exactly these settings."""
    try:
        doc = json.loads((run / "prune.json").read_text())
        same = ([r["sparsity"] for r in doc["results"]] == list(sparsities) and doc.get("scope") == scope
                and doc.get("bnt_batches") == bnt_batches and doc.get("bnt_batch_size") == bnt_batch_size
                and not doc.get("exclude"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc if same else None
