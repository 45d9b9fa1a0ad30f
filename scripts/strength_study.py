"""Does VAR's relative strength s = lambda * psi(w_init) transfer across models where lambda does not?

Issue 11's study. For every model it trains SGD and VAR at each relative strength s of
``--strengths`` and at each lambda of ``--lambdas``, for every seed, then prunes each run
one-shot (global magnitude, BN re-tuning) at ``--sparsities`` and reads the test accuracy
from the run's prune.json. Runs are ordinary `varprune train` folders under
OUT/<model>/<policy>-<value>-seed<k>; finished ones are reused, so the same command
resumes. ``--jobs`` runs go side by side, each with one torch thread.

Then, per sparsity, with acc(m, x) the mean over seeds of model m's accuracy at setting x
(a strength or a lambda), and best(m) the best over all of m's settings:

* per model: psi_init, the best lambda, the best s, SGD, and the best VAR accuracy;
* regret of one fixed value for every model: best(m) - acc(m, x), for each x of each grid
  (its mean and worst over models), and the x a user would pick: the one of least mean;
* leave-one-model-out: x chosen on the other models (least mean regret there), applied to
  the held-out model: what a user who tuned elsewhere loses;
* each model's best lambda (a parabola in log lambda through its settings near the best) against
  psi_init: slope -1 in log-log if s transfers, 0 if lambda does;
* a summary over the sparsities: the single s and the single lambda of least mean regret.

    python scripts/strength_study.py --out studies/strength             # run and report
    python scripts/strength_study.py --out studies/strength --report    # report only

Writes OUT/study.json and OUT/study.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from varprune.engine.runconfig import read_resolved
from varprune.errors import RunError
from varprune.report.results import read_prune_json
from varprune.report.tables import metric_of, setting_key

# The models: five shapes whose psi(w_init) spans about 7x at 28 px (mlp-w256 1.5e4, mlp 3.4e4,
# vit 5.0e4, resnet20 6.9e4, vgg16-w16 about 1e5); narrowed where the full model would not fit
# the CPU budget.
MODELS = {
    "mlp-w256": ["--model", "mlp", "--model-arg", "width=256"],
    "mlp": ["--model", "mlp"],
    "vit-d96x6": ["--model", "vit_tiny", "--model-arg", "dim=96", "--model-arg", "depth=6"],
    "resnet20": ["--model", "resnet20"],
    "vgg16-w16": ["--model", "vgg16_bn", "--model-arg", "width=16"],
}
# One budget for all, equal in steps (the best lambda moves with the number of steps): 2 epochs of
# 16,000 Fashion-MNIST images (28 px) at batch 128 = 250 steps. Measured on 2 CPU cores, one torch
# thread per run, two runs side by side: about 15 s per MLP run, 3.5 min per ViT or ResNet-20 run.
COMMON = [
    "--dataset",
    "fashion-mnist",
    "--epochs",
    "2",
    "--limit-train",
    "16000",
    "--batch-size",
    "128",
    "--limit-test",
    "2000",
    "--device",
    "cpu",
    "--quiet",
]
PRUNE = ["--bnt-batches", "8", "--bnt-batch-size", "250", "--scope", "global"]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def settings(args) -> list[tuple[str, float | None]]:
    return [("sgd", None)] + [("s", s) for s in args.strengths] + [("lambda", lam) for lam in args.lambdas]


def run_name(policy: str, value: float | None, seed: int) -> str:
    return f"{policy}-seed{seed}" if value is None else f"{policy}{value:g}-seed{seed}"


def train_words(model: str, policy: str, value: float | None, seed: int, run: Path) -> list[str]:
    words = ["train", *MODELS[model], *COMMON, "--seed", str(seed), "--out", str(run)]
    if policy == "sgd":
        return words + ["--method", "sgd"]
    return words + ["--method", "var", "--var-strength" if policy == "s" else "--var-lambda", repr(value)]


def varprune(words: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    with log.open("a") as f:
        f.write("$ varprune " + " ".join(words) + "\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "varprune", *words], env=env, stdout=f, stderr=f)
    if done.returncode != 0:
        raise RuntimeError(f"varprune {words[0]} failed (exit {done.returncode}); see {log}")


def pruned(run: Path, sparsities: list[float]) -> dict | None:
    """The run's accuracies at the sparsities (after BNT), or None if it is not pruned there yet."""
    try:
        doc = read_prune_json(run)
    except RunError:
        return None
    rows = {round(setting_key(r), 6): r for r in doc["results"] if not isinstance(setting_key(r), str)}
    if any(round(s, 6) not in rows for s in sparsities):
        return None
    metric = metric_of(doc)
    out = {s: rows[round(s, 6)][metric + "_bnt"] for s in sparsities}
    out["dense"] = doc["dense_" + metric]
    return out


def one_run(out: Path, model: str, policy: str, value, seed: int, sparsities: list[float]) -> Path:
    run = out / model / run_name(policy, value, seed)
    if pruned(run, sparsities) is not None:
        return run
    run.parent.mkdir(parents=True, exist_ok=True)
    log = run.parent / f"{run.name}.log"
    if not (run / "model.safetensors").is_file():  # written when training has finished
        if (run / "config.json").is_file():
            varprune(["train", "--resume", str(run), "--quiet"], log)
        else:
            varprune(train_words(model, policy, value, seed, run), log)
    varprune(["prune", str(run), "--sparsities", ",".join(map(str, sparsities)), *PRUNE, "--force"], log)
    return run


def run_all(args) -> None:
    todo = [(m, p, v, seed) for seed in args.seeds for m in args.models for p, v in settings(args)]
    t0 = time.time()
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(one_run, args.out, *job, args.sparsities): job for job in todo}
        for i, done in enumerate(futures.as_completed(jobs), 1):
            m, p, v, seed = jobs[done]
            try:
                done.result()
                status = "ok"
            except RuntimeError as e:
                status = str(e)
            print(f"[{i}/{len(todo)} {time.time() - t0:6.0f} s] {m} {run_name(p, v, seed)}: {status}", flush=True)


# ---------------------------------------------------------------- the analysis


def collect(args) -> dict:
    """results[model][(policy, value)] = {sparsity or "dense": [accuracy per seed]}; psi[model]."""
    results, psi = {}, {}
    for m in args.models:
        for p, v in settings(args):
            for seed in args.seeds:
                run = args.out / m / run_name(p, v, seed)
                acc = pruned(run, args.sparsities)
                if acc is None:
                    continue
                cell = results.setdefault(m, {}).setdefault((p, v), {})
                for k, a in acc.items():
                    cell.setdefault(k, []).append(a)
                if p == "s" and m not in psi:
                    psi[m] = read_resolved(run)["psi_init"]
    return results, psi


def lam_of(m: str, p: str, v: float, psi: dict) -> float:
    return v if p == "lambda" else v / psi[m]


def regret_table(results: dict, models: list[str], grid: list[tuple[str, float]], sp) -> dict:
    """For each grid value: regret per model (the best of that model's VAR settings, both grids, minus this one)."""
    best = {m: max(statistics.fmean(c[sp]) for x, c in results[m].items() if x[0] != "sgd") for m in models}
    return {
        x: {m: best[m] - statistics.fmean(results[m][x][sp]) for m in models}
        for x in grid
        if all(x in results[m] for m in models)
    }


def leave_one_out(reg: dict, models: list[str]) -> dict:
    """Held-out model -> (value chosen on the others, regret on the held-out model)."""
    out = {}
    for held in models if len(models) > 1 else ():
        others = [m for m in models if m != held]
        pick = min(reg, key=lambda x: statistics.fmean(reg[x][m] for m in others))
        out[held] = (pick, reg[pick][held])
    return out


def best_lambda(cells: dict, m: str, psi: dict, sp) -> float:
    """The model's best lambda at sparsity sp: vertex of a parabola in log10(lambda) through the settings
    within a decade of the best one (the best setting itself when the fit is not a maximum)."""
    pts = sorted(
        (math.log10(lam_of(m, p, v, psi)), statistics.fmean(c[sp])) for (p, v), c in cells.items() if p != "sgd"
    )
    top_x = max(pts, key=lambda t: t[1])[0]
    near = [(x, y) for x, y in pts if abs(x - top_x) <= 1.0]
    if len(near) >= 3:
        a, b, _ = np.polyfit([x for x, _ in near], [y for _, y in near], 2)
        if a < 0:
            lo, hi = pts[0][0], pts[-1][0]
            return 10 ** min(max(-b / (2 * a), lo), hi)
    return 10**top_x


def fit_slope(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error."""
    n = len(x)
    if n < 3:
        return float("nan"), float("nan")
    (slope, _icept), res, *_ = np.polyfit(x, y, 1, full=True)
    sxx = sum((v - statistics.fmean(x)) ** 2 for v in x)
    resid = float(res[0]) if len(res) else 0.0
    return float(slope), math.sqrt(resid / (n - 2) / sxx) if sxx > 0 else float("nan")


def label(x) -> str:
    p, v = x
    return f"s={v:g}" if p == "s" else f"λ={v:g}"


def report(args) -> str:
    results, psi = collect(args)
    models = [m for m in args.models if m in results and m in psi]
    seeds = ",".join(map(str, args.seeds))
    lines = [
        f"Test accuracy (%) after one-shot global pruning and BN re-tuning, mean over seeds {seeds} "
        f"(runs found: {sum(len(c[args.sparsities[0]]) for m in results for c in results[m].values())}).",
        "",
    ]
    doc = {"models": {}, "policies": {}}
    for sp in args.sparsities:
        lines += [
            f"#### {100 * sp:g}% sparsity",
            "",
            "| model | psi_init | SGD | best λ (acc) | best s (acc, its λ) | best VAR |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in models:
            cells = results[m]
            mean = {x: statistics.fmean(c[sp]) for x, c in cells.items()}
            sgd = mean.get(("sgd", None))
            lam_x = max((x for x in mean if x[0] == "lambda"), key=mean.get, default=None)
            s_x = max((x for x in mean if x[0] == "s"), key=mean.get, default=None)
            top = max(v for x, v in mean.items() if x[0] != "sgd")
            lines.append(
                f"| {m} | {psi[m]:.3g} | {100 * sgd:.2f} | " if sgd is not None else f"| {m} | {psi[m]:.3g} | - | "
            )
            lines[-1] += f"{lam_x[1]:g} ({100 * mean[lam_x]:.2f}) | " if lam_x else "- | "
            lines[-1] += f"{s_x[1]:g} ({100 * mean[s_x]:.2f}, λ={lam_of(m, *s_x, psi):.2g}) | " if s_x else "- | "
            lines[-1] += f"{100 * top:.2f} |"
            doc["models"].setdefault(m, {"psi_init": psi[m]})[str(sp)] = {
                label(x) if x[0] != "sgd" else "sgd": dict(mean=mean[x], seeds=cells[x][sp]) for x in mean
            }
        lines.append("")
        for policy, name in (("s", "relative strength s"), ("lambda", "lambda")):
            grid = [x for x in settings(args) if x[0] == policy]
            reg = regret_table(results, models, grid, sp)
            if not reg:
                continue
            loo = leave_one_out(reg, models)
            pick = min(reg, key=lambda x: statistics.fmean(reg[x].values()))
            lines += [
                f"One fixed {name} for every model: regret in points against each model's best setting "
                f"(of both grids) at {100 * sp:g}%:",
                "",
                "| value | " + " | ".join(models) + " | mean | worst |",
                "|---|" + "---:|" * (len(models) + 2),
            ]
            for x, r in reg.items():
                vals = [100 * r[m] for m in models]
                mark = " (least mean)" if x == pick else ""
                lines.append(
                    f"| {label(x)}{mark} | "
                    + " | ".join(f"{v:.2f}" for v in vals)
                    + f" | {statistics.fmean(vals):.2f} | {max(vals):.2f} |"
                )
            lines.append("")
            if loo:
                lines += [
                    "Leave one model out (value chosen on the other models, regret on the held-out one): "
                    + ", ".join(f"{m}: {label(x)} -> {100 * r:.2f}" for m, (x, r) in loo.items())
                    + f"; mean {100 * statistics.fmean(r for _, r in loo.values()):.2f}",
                    "",
                ]
            doc["policies"].setdefault(policy, {})[str(sp)] = dict(
                regret={label(x): r for x, r in reg.items()},
                least_mean=label(pick),
                leave_one_out={m: dict(value=label(x), regret=r) for m, (x, r) in loo.items()},
            )
    # the hypothesis itself: if s transfers, the best lambda falls as 1 / psi_init (slope -1 in log-log);
    # if lambda transfers, it does not move with psi (slope 0)
    lines += [
        "#### Where each model's best lambda lies, against psi_init",
        "",
        "Each model's optimum from all ten VAR settings of both grids (lambda = s / psi_init for the "
        "strengths): a parabola in log10(lambda) fitted to the points within one decade of the best "
        "one, its vertex kept within the grid.",
        "",
        "| sparsity | " + " | ".join(f"{m} λ* (s*)" for m in models) + " | slope of log λ* on log psi |",
        "|---|" + "---:|" * (len(models) + 1),
    ]
    for sp in args.sparsities:
        opt = {m: best_lambda(results[m], m, psi, sp) for m in models}
        slope, err = fit_slope([math.log10(psi[m]) for m in models], [math.log10(opt[m]) for m in models])
        lines.append(
            f"| {100 * sp:g}% | "
            + " | ".join(f"{opt[m]:.2g} ({opt[m] * psi[m]:.2g})" for m in models)
            + f" | {slope:+.2f} ± {err:.2f} |"
        )
        doc.setdefault("optimum", {})[str(sp)] = dict(
            lambda_star={m: opt[m] for m in models},
            s_star={m: opt[m] * psi[m] for m in models},
            slope=slope,
            slope_stderr=err,
        )
    lines.append("")
    # the summary a user needs: one value for every model, judged over all the sparsities at once
    lines += [
        "#### Summary over " + " and ".join(f"{100 * sp:g}%" for sp in args.sparsities),
        "",
        "| policy | value of least mean regret | mean regret | worst regret | leave-one-model-out mean |",
        "|---|---:|---:|---:|---:|",
    ]
    for policy, name in (("s", "one relative strength s"), ("lambda", "one lambda")):
        grid = [x for x in settings(args) if x[0] == policy]
        per_sp = [regret_table(results, models, grid, sp) for sp in args.sparsities]
        if not all(per_sp):
            continue
        reg = {x: {m: statistics.fmean(r[x][m] for r in per_sp) for m in models} for x in per_sp[0]}
        pick = min(reg, key=lambda x: statistics.fmean(reg[x].values()))
        loo = leave_one_out(reg, models)
        loo_mean = statistics.fmean(r for _, r in loo.values()) if loo else float("nan")
        lines.append(
            f"| {name} | {label(pick)} | {100 * statistics.fmean(reg[pick].values()):.2f} | "
            f"{100 * max(reg[pick].values()):.2f} | {100 * loo_mean:.2f} |"
        )
        doc["policies"].setdefault(policy, {})["summary"] = dict(
            least_mean=label(pick),
            mean=statistics.fmean(reg[pick].values()),
            worst=max(reg[pick].values()),
            leave_one_out={m: dict(value=label(x), regret=r) for m, (x, r) in loo.items()},
        )
    lines.append("")
    text = "\n".join(lines)
    (args.out / "study.md").write_text(text + "\n")
    (args.out / "study.json").write_text(json.dumps(doc, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    p.add_argument("--strengths", type=floats, default=[0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--lambdas", type=floats, default=[3e-6, 1e-5, 3e-5, 1e-4, 3e-4])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--sparsities", type=floats, default=[0.9, 0.95])
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (each one torch thread)")
    p.add_argument("--report", action="store_true", help="only read the finished runs and report")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"no budget for model(s) {unknown}; add them to MODELS in this script")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report:
        run_all(args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
