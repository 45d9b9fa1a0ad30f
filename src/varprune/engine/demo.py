"""``varprune demo``: SGD against VAR on Fashion-MNIST, pruned one-shot, sized to the machine (``--task
segmentation``: engine.segdemo; ``--task lm``: engine.lmdemo).

On a GPU it runs the setup of the reference measurement (CIFAR-style ResNet-18,
15 epochs, batch 256, bf16); on CPU a BatchNorm MLP on all 60k images for 10
epochs, chosen by measurement to finish within 10 minutes on 2 cores and still
show VAR's gap at high sparsity.
Completed runs in the output folder are reused; interrupted ones resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from varprune.device import describe_device, resolve_device
from varprune.engine.checks import problems
from varprune.engine.config import TrainConfig
from varprune.engine.progress import Progress, Step, training_cost
from varprune.engine.sweep import SweepSpec, prune_runs
from varprune.engine.trained import ensure_run
from varprune.errors import RunError
from varprune.storage.files import OutputFolder

SIZES = {
    # the reference measurement's setup (docs/background.md)
    "gpu": dict(
        model="resnet18",
        epochs=15,
        batch_size=256,
        var_lambda=1e-6,
        channels_last=True,
        sparsities=[0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99],
    ),
    # measured on 2 CPU cores (see README): a ResNet-20 gets too few steps in 10 minutes for VAR to
    # matter; the MLP trains 4,690 steps and VAR 1e-4 keeps 83% at 95% sparsity where SGD keeps 67%
    "cpu": dict(
        model="mlp", epochs=10, batch_size=128, var_lambda=1e-4, sparsities=[0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
    ),
    # a smoke test of the whole pipeline (seconds); shows nothing about VAR
    "tiny": dict(
        model="mlp", epochs=1, batch_size=128, limit_train=1000, limit_test=500, var_lambda=1e-4, sparsities=[0.5, 0.9]
    ),
}
DATASET = "fashion-mnist"
TITLE = "Fashion-MNIST: SGD vs VAR, one-shot pruning"


def demo_configs(size: str, data_dir: str | None, sizes=None, dataset=DATASET):
    """The two runs (baseline without VAR, with VAR) and the sweep of one demo size."""
    settings = dict((sizes or SIZES)[size])
    spec = SweepSpec.take(settings)
    var = {k: settings.pop(k) for k in ("var_lambda", "var_strength") if k in settings}
    common = dict(dataset=dataset, data_dir=data_dir, **settings)
    base = TrainConfig(method="sgd", **common)
    # folder names say what ran: "sgd"/"var" on SGD, "adamw"/"adamw+var" where the task's optimizer is AdamW
    prefix = "adamw+" if base.optimizer == "adamw" else ""
    return [
        (base.optimizer, base),
        (f"{prefix}var", TrainConfig(method="var", **var, **common)),
    ], spec


def _pretrained_row(cfg: TrainConfig, spec: SweepSpec, out: Path, log) -> tuple[str, dict]:
    """The folder the fine-tuning runs started from, swept as they are (engine.pretrained): same test
    windows, same calibration draw; OUT/prune.json reused by the rule a run's sweep is."""
    from varprune.engine.pretrained import prune_folder

    doc = prune_folder(
        cfg.model,
        cfg.dataset,
        cfg.data_dir,
        out,
        seq_len=cfg.seq_len,
        pruners=spec.pruners,
        sparsities=spec.sparsities,
        patterns=spec.patterns,
        limit_test=cfg.limit_test,
        calib_samples=spec.calib_samples,
        choices=spec.choices,
        log=log,
    )
    return "pretrained", doc


def run_demo(
    out: Path,
    size: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
    log=print,
    task: str = "classification",
    overwrite: bool = False,
    model: str | None = None,
) -> dict:
    from varprune.report.figures import sweep_plot
    from varprune.report.tables import sweep_table

    folder = OutputFolder(out, "demo", overwrite=overwrite, legacy=None)
    folder.check(("demo.png", "results.md", "examples.png"))
    device = resolve_device("auto")
    if size == "auto":
        size = "gpu" if device.type == "cuda" else "cpu"
    figure: Callable[..., None] | None  # the example predictions (examples.png): segmentation only
    if task == "segmentation":
        from varprune.engine import segdemo

        configs, spec = demo_configs(size, data_dir, segdemo.SIZES, segdemo.DATASET)
        title, figure = segdemo.TITLE, segdemo.figure
    elif task == "lm":
        from varprune.engine import lmdemo

        configs, spec = demo_configs(size, data_dir, lmdemo.SIZES, lmdemo.DATASET)
        title, figure = lmdemo.TITLE, None
    elif task == "llm":
        from varprune.engine import llmdemo

        source = Path(model[3:]) if model else llmdemo.pretrained_folder(log)
        sizes = {size: {**llmdemo.SIZES[size], "model": f"hf:{source}"}}  # the folder fine-tuned and pruned
        configs, spec = demo_configs(size, data_dir, sizes, llmdemo.DATASET)
        title = llmdemo.TITLE if model is None else f"fortunes, {source.name}: AdamW vs AdamW+VAR fine-tuning"
        figure = None
    else:
        configs, spec = demo_configs(size, data_dir)
        title, figure = TITLE, None
    found = [p for _, cfg in configs for p in problems(cfg)]  # a missing library, say: before anything is written
    if found:
        raise RunError(found[0])
    folder.mkdir()
    log(f"varprune demo ({task}, {size} size) on {describe_device(device)}, runs in {out}")
    t0 = time.perf_counter()
    steps = [Step(f"training {out / name}", "train", training_cost(cfg)) for name, cfg in configs]
    steps.append(Step(f"pruning {len(configs)} runs", "prune", float(len(configs))))
    tracker = Progress("demo", steps, log)
    runs = []
    for i, (name, cfg) in enumerate(configs):
        tracker.begin(i)
        done = ensure_run(cfg, out / name, log=log, progress=progress)
        tracker.end(i, reused=done == "reused")
        runs.append(out / name)
    train_s = time.perf_counter() - t0
    tracker.begin(len(configs))
    rows = prune_runs(runs, spec, data_dir=data_dir, log=log, reuse=True)
    if task == "llm":  # the pretrained model itself, pruned the same way: the row fine-tuning is measured against
        rows.insert(0, _pretrained_row(configs[0][1], spec, out / "pretrained", log))
    tracker.end(len(configs))
    table = sweep_table(rows)
    sweep_plot(rows, out / "demo.png", title=title)
    folder.record("demo.png")
    extra = ""
    if figure is not None:
        figure(runs, out / "examples.png", sparsity=0.95)
        folder.record("examples.png")
        extra = f"Example slices: {out / 'examples.png'}\n\n"
    total_s = time.perf_counter() - t0
    machine = describe_device(device)
    summary = (
        f"# varprune demo ({task}, {size})\n\nMachine: {machine}, torch {torch.__version__}. "
        f"Wall time {total_s / 60:.1f} min ({train_s / 60:.1f} min training).\n\n"
        f"Configuration: {json.dumps(configs[1][1].to_dict())}\n\n{extra}{table}"
    )
    folder.write_text("results.md", summary)
    print(table)
    log(f"plot: {out / 'demo.png'}; summary: {out / 'results.md'}; {total_s / 60:.1f} min in all")
    return {"rows": rows, "size": size, "seconds": total_s}
