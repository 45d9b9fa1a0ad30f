"""Any timm model as ``timm:<name>``, built with random weights and nothing downloaded.

``create_model("timm:resnet18", in_channels=1, num_classes=10, image_size=32)``
calls ``timm.create_model(name, pretrained=False, in_chans=..., num_classes=...)``.
``pretrained`` is always False: varprune never fetches weights; start from
trained weights with ``--init FILE`` (varprune.init_weights) instead.

``img_size`` is passed only to models whose timm configuration says their
input size is fixed (``fixed_input_size``: ViTs, Swin, MLP-Mixers: their
positional embeddings or windows depend on it); convolutional networks take
any size and do not accept the argument. timm's ImageNet stems downsample by
4 to 32, so at 28-64 px a timm ResNet sees tiny feature maps: the CIFAR-stem
models of varprune (resnet18, wrn28_10) are the usual choice there.

timm is optional: ``pip install timm`` or ``pip install varprune[timm]``.
"""

from __future__ import annotations

import difflib

from torch import nn

PREFIX = "timm:"


class TimmModelError(ValueError):
    """timm is missing, or the name is not one of its models."""


def _timm():
    try:
        import timm
    except ImportError:
        raise TimmModelError(
            "timm:<name> models need timm: pip install timm (or pip install 'varprune[timm]')"
        ) from None
    return timm


def timm_model_problem(name: str) -> str | None:
    """Why ``timm:<name>`` cannot be built (timm missing, unknown name), or None. Cheap: builds nothing."""
    try:
        _check(name)
    except TimmModelError as e:
        return str(e)
    return None


def _check(name: str):
    timm = _timm()
    base = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not base:
        raise TimmModelError("empty timm model name: write timm:<name>, e.g. timm:resnet18")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=4, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "see timm.list_models() for the names"
        )
        raise TimmModelError(f"unknown timm model {base!r}: {hint}")
    return timm, base


def create_timm_model(
    name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **kwargs
) -> nn.Module:
    """Build timm model ``name`` (with or without the ``timm:`` prefix), random weights.

    Extra keyword arguments go to ``timm.create_model`` (e.g. ``drop_rate``);
    ``pretrained`` may not be among them. Raises :class:`TimmModelError`
    (a ValueError) when timm is missing or the name is unknown.
    """
    if kwargs.get("pretrained"):
        raise TimmModelError(
            "varprune builds timm models without downloaded weights; load trained weights with --init FILE instead"
        )
    kwargs.pop("pretrained", None)
    timm, base = _check(name)
    args = dict(pretrained=False, in_chans=int(in_channels), num_classes=int(num_classes), **kwargs)
    cfg = timm.models.get_pretrained_cfg(base)
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and "img_size" not in args:
        args["img_size"] = int(image_size)
    try:
        return timm.create_model(base, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TimmModelError(
            f"timm could not build {base!r} for {in_channels} channel(s), {image_size} px, "
            f"{num_classes} classes ({text})"
        ) from None
