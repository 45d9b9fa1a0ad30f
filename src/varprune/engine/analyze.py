"""``varprune analyze RUN...``: why a run survives pruning (or does not), on its own weights.

For each finished run: the weight-magnitude histograms (global and per layer,
runs overlaid), the per-layer variance of |w| over training (metrics.jsonl),
the per-layer sparsity that global pruning chooses, per-layer pruning
sensitivity against per-layer variance (one layer pruned at a time, BN
re-tuned, the task's primary metric), and flatness: the largest Hessian
eigenvalue of the training loss and a loss profile along a filter-normalised
random direction (eval-mode BatchNorm, a fixed set of training batches).

Writes OUT/analysis.json and OUT/*.png; reads runs, never changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from varprune.engine.rundir import read_metrics
from varprune.engine.sweep import check_runs, load_trained, run_label
from varprune.errors import RunError
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
from varprune.storage.checkpoint import atomic_write_text

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def _history(run: Path) -> list[tuple[int, dict]]:
    """(epoch, per-layer variance) from metrics.jsonl; a damaged file is a one-line RunError naming the line."""
    return [(r["epoch"], r["layer_variance"]) for r in read_metrics(run) if isinstance(r.get("layer_variance"), dict)]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


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
) -> dict:
    """Analyse finished runs into ``out`` (analysis.json and figures); return the analysis document."""
    configs, found = check_runs(runs, data_dir)
    if out.exists() and not out.is_dir():
        found.append(f"{out} exists and is not a folder; choose another --out")
    if found:
        raise RunError("; ".join(found))
    out.mkdir(parents=True, exist_ok=True)
    labels = [run_label(c) for c in configs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r.name})" for lab, r in zip(labels, runs)]
    cache: dict = {}
    trained = {lab: load_trained(run, cfg, device, cache) for lab, run, cfg in zip(labels, runs, configs)}
    doc: dict = {"runs": {}, "sensitivity_sparsity": sensitivity_sparsity, "sparsities": list(sparsities)}

    hists = magnitude_histograms({lab: t.model for lab, t in trained.items()})
    figures = {
        "histograms": Path(magnitude_histogram_figure(hists, out / "histograms.png")).name,
        "layer_histograms": Path(layer_histogram_figure(hists, out / "layer_histograms.png")).name,
    }
    profiles = {}
    for (lab, t), run in zip(trained.items(), runs):
        log(f"analysing {run} ({lab})")
        model, task = t.model, t.task
        entry: dict = {"run": str(run)}
        variances = layer_variances(model)
        entry["layer_variance"] = variances
        slug = _slug(lab)
        history = _history(run)
        entry["figures"] = {
            "layer_variance": Path(
                layer_variance_figure(
                    history,
                    out / f"{slug}-variance.png",
                    final=variances,
                    final_epoch=t.cfg.epochs,
                    title=f"{lab}: per-layer variance of |w| over training",
                )
            ).name
        }
        layer_sparsity = global_layer_sparsity(model, sparsities)
        entry["layer_sparsity"] = {str(s): v for s, v in layer_sparsity.items()}
        entry["figures"]["layer_sparsity"] = Path(
            layer_sparsity_figure(layer_sparsity, out / f"{slug}-sparsity.png")
        ).name
        bnt = t.bnt(bnt_batches, bnt_batch_size)
        if sensitivity:

            def evaluate(m, task=task, t=t):
                return task.evaluate(m, t.data.test_loader, t.amp)[task.primary]

            def retune(m, bnt=bnt):
                if bnt:
                    recalibrate_bn(m, bnt)

            sens = layer_sensitivity(model, evaluate, retune, sensitivity_sparsity)
            entry["layer_sensitivity"] = sens
            common = [n for n in sens if n in variances]
            entry["sensitivity_variance_spearman"] = (
                spearman([variances[n] for n in common], [sens[n] for n in common]) if len(common) > 2 else None
            )
            entry["figures"]["sensitivity"] = Path(
                sensitivity_figure(
                    sens, variances, out / f"{slug}-sensitivity.png", metric=task.primary, sparsity=sensitivity_sparsity
                )
            ).name
        # flatness: fixed, unaugmented training batches, eval-mode BatchNorm
        images = t.data.train_loader.images
        labels_t = t.data.train_loader.labels
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(images), generator=g)[: batches * batch_size].to(images.device)
        fixed = [
            (t.data.train_loader.normalize(images[pick[i : i + batch_size]]), labels_t[pick[i : i + batch_size]])
            for i in range(0, len(pick), batch_size)
        ]
        model.eval()
        entry["hessian_top_eigenvalue"] = hessian_top_eigenvalue(model, task.loss, fixed, iters=hessian_iters)
        alphas = [i / 10 for i in range(-10, 11)]
        entry["loss_profile"] = {"alphas": alphas, "loss": loss_profile(model, task.loss, fixed, alphas)}
        profiles[f"{lab} (λmax {entry['hessian_top_eigenvalue']:.3g})"] = (alphas, entry["loss_profile"]["loss"])
        doc["runs"][lab] = entry
    figures["flatness"] = Path(flatness_figure(profiles, out / "flatness.png")).name
    doc["figures"] = figures
    atomic_write_text(out / "analysis.json", json.dumps(doc, indent=2) + "\n")
    log(
        f"wrote {out / 'analysis.json'} and {len(figures) + sum(len(e['figures']) for e in doc['runs'].values())} "
        f"figures in {out}"
    )
    return doc
