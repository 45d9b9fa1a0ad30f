"""``varprune analyze RUN...``: why a run survives pruning (or does not), on its own weights.

For each finished run: the weight-magnitude histograms (global and per layer,
runs overlaid), the per-layer variance of |w| over training (metrics.jsonl),
the per-layer sparsity that global pruning chooses, per-layer pruning
sensitivity against per-layer variance (one layer pruned at a time, BN
re-tuned, the task's primary metric), and flatness: the largest Hessian
eigenvalue of the training loss and a loss profile along a filter-normalised
random direction (eval-mode BatchNorm, a fixed set of training batches).

Writes OUT/analysis.json and OUT/*.png; reads runs, never changes them.

The analysis is sized to the runs' own budget (:func:`analysis_plan`): a run
trained on 1,000 images for one epoch is not analysed on 10,000. Its progress
and expected time are logged, and the time it took is in analysis.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from varprune.engine.identity import other_data_line
from varprune.engine.rundir import read_metrics
from varprune.engine.sweep import check_runs, load_trained, run_label
from varprune.engine.trained import bnt_problems
from varprune.errors import RunError, UsageError
from varprune.numerics.hessian import hessian_top_eigenvalue, loss_profile
from varprune.numerics.pruning import recalibrate_bn
from varprune.numerics.sensitivity import (
    global_layer_sparsity,
    layer_sensitivity,
    layer_variances,
    magnitude_histograms,
)
from varprune.report.analysis_figures import (
    flatness_figure,
    layer_histogram_figure,
    layer_sparsity_figure,
    layer_variance_figure,
    magnitude_histogram_figure,
    sensitivity_figure,
    spearman,
)
from varprune.storage.files import OutputFolder

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def _history(run: Path) -> list[tuple[int, dict]]:
    """(epoch, per-layer variance) from metrics.jsonl; a damaged file is a one-line RunError naming the line."""
    return [(r["epoch"], r["layer_variance"]) for r in read_metrics(run) if isinstance(r.get("layer_variance"), dict)]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


@dataclass(frozen=True)
class AnalysisPlan:
    """How much data one run's analysis reads, sized to what the run itself was trained on."""

    bnt_images: int  # BatchNorm re-tuning images for each one-layer pruning
    hessian_examples: int  # training examples of the loss the Hessian and the profile are taken on
    hessian_iters: int
    forward_passes: float  # the plan's cost, in example forward passes
    training_passes: float  # the run's training cost, same unit (forward + backward counted as 3 forwards)


def analysis_plan(
    epochs: int,
    train_examples: int,
    test_examples: int,
    layers: int,
    bnt_images: int,
    hessian_examples: int,
    hessian_iters: int,
    sensitivity: bool = True,
    budget: float = 1.0,
) -> AnalysisPlan:
    """The analysis for one run, at most ``budget`` times its training cost (but never below a floor that still
    measures something: one re-tuning batch, 64 examples for the Hessian).

    Cost model (example forward passes): per-layer sensitivity ``(layers + 1) * (bnt + test)``; Hessian power
    iteration ``iters * n * 4`` (a Hessian-vector product is a forward and a double backward); the loss profile
    ``21 * n``; training ``epochs * train_examples * 3``. Re-tuning and Hessian examples shrink together by one
    factor until the plan fits.
    """
    bnt = min(bnt_images, train_examples)
    n = min(hessian_examples, train_examples)
    training = 3.0 * epochs * train_examples

    def cost(b: int, h: int) -> float:
        sens = (layers + 1) * (b + test_examples) if sensitivity else 0.0
        return sens + hessian_iters * h * 4 + 21 * h

    full = cost(bnt, n)
    if full > budget * training:
        fixed = (layers + 1) * test_examples if sensitivity else 0.0
        scalable = full - fixed
        factor = max(0.0, (budget * training - fixed) / scalable) if scalable > 0 else 1.0
        bnt = max(min(bnt, 64), math.floor(bnt * factor))
        n = max(min(n, 64), math.floor(n * factor))
    return AnalysisPlan(bnt, n, hessian_iters, cost(bnt, n), training)


def analysis_files(labels: list[str], sensitivity: bool = True) -> list[str]:
    """The files an analysis of runs with these labels writes (checked before any work)."""
    names = ["analysis.json", "histograms.png", "layer_histograms.png", "flatness.png"]
    for lab in labels:
        slug = _slug(lab)
        names += [f"{slug}-variance.png", f"{slug}-sparsity.png"] + ([f"{slug}-sensitivity.png"] if sensitivity else [])
    return names


def check_analysis_flags(
    sensitivity_sparsity: float, hessian_iters: int, bnt_batches: int, bnt_batch_size: int
) -> list[str]:
    """Every problem with the analysis flags, as one-line messages naming the flag (nothing is written)."""
    found = []
    if not 0 < sensitivity_sparsity < 1:
        found.append(f"--sensitivity-sparsity must be in (0, 1), got {sensitivity_sparsity}")
    if isinstance(hessian_iters, bool) or not isinstance(hessian_iters, int) or not 1 <= hessian_iters <= 10_000:
        found.append(f"--hessian-iters must be an integer in [1, 10000] (power iterations), got {hessian_iters}")
    return found + bnt_problems(bnt_batches, bnt_batch_size)


def analyze_runs(
    runs: list[Path],
    out: Path,
    sensitivity_sparsity: float = 0.9,
    sparsities=SPARSITIES,
    batches: int = 4,
    batch_size: int = 128,
    hessian_iters: int = 20,
    bnt_batches: int = 20,
    bnt_batch_size: int = 500,
    sensitivity: bool = True,
    device: str = "auto",
    data_dir: str | None = None,
    log=print,
    overwrite: bool = False,
    budget: float | None = None,
    other_data: bool = False,
) -> dict:
    """Analyse finished runs into ``out`` (analysis.json and figures); return the analysis document.
    ``other_data`` (``--other-data``): measure on text other than the runs' (each run's entry records it);
    without it such a ``data_dir`` is refused (engine/identity.py).

    ``budget``: the analysis of each run costs at most this many times its training (see
    :func:`analysis_plan`); None reads the full amounts given (``bnt_batches * bnt_batch_size`` re-tuning
    images and ``batches * batch_size`` Hessian examples, capped at the run's training set).
    """
    found = check_analysis_flags(sensitivity_sparsity, hessian_iters, bnt_batches, bnt_batch_size)
    if found:
        raise UsageError("; ".join(found))
    configs, found = check_runs(runs, data_dir)
    if found:
        raise RunError("; ".join(found))
    labels = [run_label(c) for c in configs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r.name})" for lab, r in zip(labels, runs)]
    folder = OutputFolder(out, "analysis", overwrite=overwrite, legacy=("analysis.json", ("runs", "figures")))
    folder.check(analysis_files(labels, sensitivity))  # before any work: nothing is written on a refusal
    started = time.perf_counter()
    cache: dict = {}
    trained = {lab: load_trained(run, cfg, device, cache, other_data) for lab, run, cfg in zip(labels, runs, configs)}
    doc: dict = {"runs": {}, "sensitivity_sparsity": sensitivity_sparsity, "sparsities": list(sparsities)}
    folder.mkdir()

    def figure(name: str, write) -> str:
        write(out / name)
        folder.record(name)
        return name

    hists = magnitude_histograms({lab: t.model for lab, t in trained.items()})
    figures = {
        "histograms": figure("histograms.png", lambda p: magnitude_histogram_figure(hists, p)),
        "layer_histograms": figure("layer_histograms.png", lambda p: layer_histogram_figure(hists, p)),
    }
    profiles = {}
    for (lab, t), run in zip(trained.items(), runs):
        model, task = t.model, t.task
        layers = len(layer_variances(model))
        plan = analysis_plan(
            t.cfg.epochs,
            t.train_examples,
            t.test_examples,
            layers,
            bnt_batches * bnt_batch_size,
            batches * batch_size,
            hessian_iters,
            sensitivity,
            budget if budget is not None else float("inf"),
        )
        retuning = f"BN re-tuning on {plan.bnt_images} images" if t.has_batchnorm else "no BatchNorm to re-tune"
        log(
            f"analysing {run} ({lab}): {layers} layers, {retuning}, Hessian on "
            f"{plan.hessian_examples} examples x {plan.hessian_iters} iterations "
            f"({plan.forward_passes / max(plan.training_passes, 1):.2f}x the run's training cost)"
        )
        run_started = time.perf_counter()
        entry: dict = {"run": str(run), "plan": asdict(plan)}
        if t.other_data is not None:
            log(other_data_line(str(run), t.other_data))
            entry["other_data"] = t.other_data
        variances = layer_variances(model)
        entry["layer_variance"] = variances
        slug = _slug(lab)
        history = _history(run)
        entry["figures"] = {
            "layer_variance": figure(
                f"{slug}-variance.png",
                lambda p, h=history, v=variances, t=t, lab=lab: layer_variance_figure(
                    h, p, final=v, final_epoch=t.cfg.epochs, title=f"{lab}: per-layer variance of |w| over training"
                ),
            )
        }
        layer_sparsity = global_layer_sparsity(model, sparsities)
        entry["layer_sparsity"] = {str(s): v for s, v in layer_sparsity.items()}
        entry["figures"]["layer_sparsity"] = figure(
            f"{slug}-sparsity.png", lambda p, ls=layer_sparsity: layer_sparsity_figure(ls, p)
        )
        bnt = t.bnt(0, bnt_batch_size, images=plan.bnt_images) if bnt_batches else []
        if sensitivity:

            def evaluate(m, task=task, t=t):
                return task.evaluate(m, t.data.test_loader, t.amp)[task.primary]

            def retune(m, bnt=bnt):
                if bnt:
                    recalibrate_bn(m, bnt)

            clock = {"start": time.perf_counter()}

            def progress(done, total, clock=clock):
                if done == 1:
                    each = time.perf_counter() - clock["start"]
                    log(f"  sensitivity: {total - 1} one-layer prunings, about {each * (total - 1):.0f} s")

            sens = layer_sensitivity(
                model, evaluate, retune, sensitivity_sparsity, higher_is_better=task.higher_is_better, progress=progress
            )
            entry["layer_sensitivity"] = sens
            common = [n for n in sens if n in variances]
            entry["sensitivity_variance_spearman"] = (
                spearman([variances[n] for n in common], [sens[n] for n in common]) if len(common) > 2 else None
            )
            entry["figures"]["sensitivity"] = figure(
                f"{slug}-sensitivity.png",
                lambda p, s=sens, v=variances, task=task: sensitivity_figure(
                    s, v, p, metric=task.primary, sparsity=sensitivity_sparsity
                ),
            )
        # flatness: fixed, unaugmented training batches, eval-mode BatchNorm
        fixed = t.fixed_batches(plan.hessian_examples, batch_size)
        model.eval()
        entry["hessian_top_eigenvalue"] = hessian_top_eigenvalue(model, task.loss, fixed, iters=plan.hessian_iters)
        alphas = [i / 10 for i in range(-10, 11)]
        entry["loss_profile"] = {"alphas": alphas, "loss": loss_profile(model, task.loss, fixed, alphas)}
        profiles[f"{lab} (λmax {entry['hessian_top_eigenvalue']:.3g})"] = (alphas, entry["loss_profile"]["loss"])
        entry["seconds"] = time.perf_counter() - run_started
        log(f"  done in {entry['seconds']:.0f} s")
        doc["runs"][lab] = entry
    figures["flatness"] = figure("flatness.png", lambda p: flatness_figure(profiles, p))
    doc["figures"] = figures
    doc["seconds"] = time.perf_counter() - started
    folder.write_text("analysis.json", json.dumps(doc, indent=2) + "\n")
    log(
        f"wrote {out / 'analysis.json'} and {len(figures) + sum(len(e['figures']) for e in doc['runs'].values())} "
        f"figures in {out} ({doc['seconds']:.0f} s)"
    )
    return doc
