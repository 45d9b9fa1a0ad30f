"""What a training run says about its schedule and its loss, so that neither surprises.

Warm-up is set in epochs (``--warmup-epochs``) but acts in optimizer steps: on a small text with a large batch an
epoch is a handful of steps and one epoch of warm-up can be the whole run. The first lines of a run say the
schedule in steps, and warn when an epoch has fewer than :data:`FEW_STEPS` steps or warm-up never ends. The
epoch line's loss is what the optimizer minimises: with a regularizer, the task's loss plus its term, so both
parts are shown beside the total.
"""

from __future__ import annotations

from varprune.engine.config import TrainConfig
from varprune.engine.methods import get_method

# fewer optimizer steps than this in an epoch leave the learning-rate schedule (warm-up, cosine) no room
FEW_STEPS = 20


def schedule_lines(cfg: TrainConfig, steps_per_epoch: int, warmup: int) -> list[str]:
    """The schedule in steps, and a warning line for each way it leaves training little room."""
    total = cfg.epochs * steps_per_epoch
    lines = [
        f"schedule: {steps_per_epoch} optimizer steps an epoch (batch {cfg.batch_size}), {total} in all; "
        f"warm-up {warmup} steps (--warmup-epochs {cfg.warmup_epochs:g}), then cosine decay"
    ]
    if steps_per_epoch < FEW_STEPS:
        lines.append(
            f"warning: an epoch is only {steps_per_epoch} optimizer step{'s' * (steps_per_epoch != 1)}: lower "
            f"--batch-size (now {cfg.batch_size}) or train on more data"
            + (" (--limit-train)" if cfg.limit_train is not None else "")
        )
    if total > 0 and warmup >= total:
        lines.append(
            f"warning: warm-up takes all {total} steps, so the learning rate never decays: lower --warmup-epochs "
            f"or raise --epochs"
        )
    return lines


def loss_text(cfg: TrainConfig, total: float, term: float, regularized: bool) -> str:
    """The epoch line's loss: the task's loss alone, or the total the optimizer minimises (``total``) with its two
    parts, the task's and the regularizer's ``term``."""
    if not regularized:
        return f"loss {total:.4f}"
    names = "+".join(get_method(cfg.method).regularizers)
    return f"loss {total:.4f} (task {total - term:.4f} + {names} {term:.4f})"
