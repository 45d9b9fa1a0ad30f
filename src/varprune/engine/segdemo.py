"""``varprune demo --task segmentation``: SGD against VAR on the Colin27 brain MRI.

One subject's T1 MRI (Debian's mricron-data), axial slices, AAL regions grouped
into seven structures plus background (segdata.read_colin27): a demonstration
that runs offline on 2 CPU cores, not a benchmark. The sizes below were chosen
by measurement (README, "Segmentation").
"""

from __future__ import annotations

from pathlib import Path

import torch

from varprune.report.figures import save_png

DATASET = "colin27"
TITLE = "Colin27 brain MRI: SGD vs VAR, one-shot pruning (mean foreground Dice)"
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
# Chosen by measurement on 2 CPU cores (README, "Segmentation"): 64 px slices, batch 8, 80 epochs (1,120
# steps); 96 px or 40 epochs learned too little to compare. VAR at s = 0.3: of s = 0.3, 1, 3 over three seeds
# (scripts/open_questions.py segmentation) the only strength with a gain whose interval excludes zero (+6.4
# Dice points at 95%) and no significant dense cost (s = 3 cost 1.6 points).
SIZES = {
    "gpu": dict(
        model="unet", image_size=96, epochs=150, batch_size=8, lr=0.05, var_strength=0.3, sparsities=SPARSITIES
    ),
    "cpu": dict(model="unet", image_size=64, epochs=80, batch_size=8, lr=0.05, var_strength=0.3, sparsities=SPARSITIES),
    "tiny": dict(
        model="unet",
        image_size=64,
        epochs=1,
        batch_size=8,
        lr=0.05,
        limit_train=32,
        limit_test=8,
        var_strength=0.3,
        sparsities=[0.5, 0.9],
    ),
}


def figure(
    runs: list[Path],
    path: Path,
    sparsity: float = 0.95,
    slices: int = 3,
    bnt_batches: int = 20,
    bnt_batch_size: int = 500,
) -> None:
    """Example test slices: input, ground truth, and each run's prediction dense and pruned
    one-shot at ``sparsity`` after BN re-tuning (the sweep's protocol)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from varprune.engine.sweep import load_trained, run_label
    from varprune.numerics.pruning import prune_magnitude, recalibrate_bn

    cache: dict = {}
    trained = [load_trained(run, data_cache=cache) for run in runs]
    loader = trained[0].data.test_loader
    n = len(loader.images)
    # the slices with the most foreground classes, spread over the test set
    picks = sorted(range(n), key=lambda i: -int(loader.labels[i].unique().numel()))[:slices]
    x = loader.normalize(loader.images[picks])
    y = loader.labels[picks].cpu()
    k = trained[0].data.data.info.num_classes
    columns = [("input", None), ("ground truth", y)]
    for t in trained:
        model = t.model.eval()
        with torch.no_grad():
            dense = model(x).argmax(1).cpu()
            prune_magnitude(model, sparsity)
            recalibrate_bn(model, t.bnt(bnt_batches, bnt_batch_size))
            pruned = model(x).argmax(1).cpu()
        label = run_label(t.cfg)
        columns += [(f"{label}\ndense", dense), (f"{label}\n{100 * sparsity:g}% + BNT", pruned)]
    fig, axes = plt.subplots(slices, len(columns), figsize=(2.1 * len(columns), 2.2 * slices), dpi=110, squeeze=False)
    image = loader.images[picks].float().cpu()[:, 0]
    for r in range(slices):
        for c, (title, labels) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(image[r], cmap="gray")
            if labels is not None:
                masked = torch.where(labels[r] > 0, labels[r].float(), torch.tensor(float("nan")))
                ax.imshow(masked, cmap="tab10", vmin=0, vmax=max(9, k), alpha=0.55, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
