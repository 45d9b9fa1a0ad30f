"""Sequential calibration: the machinery shared by the calibrated one-shot pruners (Wanda, SparseGPT).

A calibrated pruner needs, for every prunable layer, statistics of its inputs (Wanda: the norm of every input
feature; SparseGPT: ``X Xᵀ``), taken on inputs that the *already pruned* earlier part of the network produces
(the references' sequential protocol). This module finds the layers, views every weight as a matrix
``(out, in)`` with matching input rows, and drives the calibration:

* **Matrix view** (`Target`): ``nn.Linear`` as it is; GPT-2's ``Conv1D`` (stored ``(in, out)``) as its
  transpose; ``nn.Conv1d/2d/3d`` (``groups=1``) as ``(out, in*k...)`` with unfolded inputs, so that
  ``conv(x) = rows @ W.T + b``. Other prunable weights fall back to magnitude pruning at the same setting,
  the reason recorded: grouped and transposed convolutions, ``nn.MultiheadAttention``'s packed projections
  and ``out_proj`` (its parent uses the weight directly: the layer never runs), recurrent weights,
  ``nn.Bilinear``, linear classes that are not ``nn.Linear``, any layer not called in a forward pass.
* **Block stack** (`find_block_stack`): the longest ``nn.ModuleList``/``nn.Sequential`` of two or
  more children of one class (not itself a container class) in which every child holds a pruned weight
  and the children together hold at least half of the pruned tensors (``transformer.h`` of GPT-2,
  ``model.layers`` of Llama, ``blocks`` of varprune's ViT; no CNN or MLP of this package qualifies). It is
  used only if one forward pass of the first batch shows a chain: every block called once, in order, each
  block's hidden-state input being the previous block's output (or its ``[0]``), and every other argument
  the same as the first block's (attention mask, position embeddings, ...).
* **Block by block** (when a chain is found): layers before the stack go layer by layer (below); then the
  first block's inputs (args and kwargs) are captured for every batch (the forward stops there); each block
  runs on every captured input with hooks on all its pruned layers (all of a block's layers from this one
  pass, as the references do), its layers are pruned, and the pruned block re-runs to make the next
  block's inputs; layers after the stack (a classifier, an LM head) go layer by layer at the end.
* **Layer by layer** (any other model): in forward order (each layer's first call), one layer at a time,
  each from forward passes of the model whose earlier layers are pruned already; a pass stops as soon as the
  layer has been called as often as in the first batch's forward. A Hugging Face ``config.use_cache`` and
  PyTorch's fused attention fast path are off meanwhile.

Cost with B batches (``PruneResult.passes`` counts it): one forward of the first batch for the order; layer by
layer, B partial forwards per layer (at most L·B full forwards for L layers); block by block, B partial forwards
to capture, 2·B block runs per block (B for the last), B forwards per outside layer. Memory: the inputs, and
block by block every batch's hidden states twice (a block's inputs and outputs; engine.memory estimates it).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from varprune.errors import MODEL_INPUT_ERRORS, is_out_of_memory
from varprune.numerics.pruning import (
    PruneResult,  # defined beside the magnitude pruner, re-exported here where it lived before 0.4
    PruningError,
    check_sparsity,
    keep_mask_topk,
    nm_masks,
    owner_of,
    parse_pattern,
    stores_transposed,
)
from varprune.numerics.weights import WeightSelectionError, prunable_weights

__all__ = ["PruneResult", "Setting", "Target", "find_block_stack", "prune_sequentially", "unfold_conv"]


@dataclass(frozen=True)
class Setting:
    """One pruning setting: unstructured ``sparsity`` or an N:M pattern ``nm = (n, m)``."""

    sparsity: float | None = None
    nm: tuple[int, int] | None = None

    @classmethod
    def of(cls, sparsity, pattern) -> Setting:
        if (sparsity is None) == (pattern is None):
            got = "both" if sparsity is not None else "neither"
            raise PruningError(
                f"give exactly one of sparsity= (unstructured, e.g. 0.5) or pattern= (N:M, e.g. '2:4'); got {got}"
            )
        if sparsity is not None:
            return cls(sparsity=check_sparsity(sparsity))
        return cls(nm=parse_pattern(pattern))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for a float64 weight, else float32: the precision statistics and updates are computed in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def unfold_conv(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The input rows of a convolution: ``(B * positions, in * k1 * ... * kd)``, so ``conv(x)`` equals
    ``rows @ conv.weight.reshape(out, -1).T + bias`` (for ``groups=1``), for 1-, 2- and 3-d convolutions.

    Pads as the conv does (its padding, ``"same"`` included, and padding mode), then takes windows with its
    stride and dilation; columns in the weight's ``(in, k1, ..., kd)`` row-major order (``F.unfold``'s).
    """
    d = conv.weight.dim() - 2
    if x.dim() == d + 1:  # unbatched input
        x = x.unsqueeze(0)
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    for i, (k, s, dil) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)  # positions stay in dim 2+i; the window goes last
        if dil > 1:
            x = x[..., ::dil]
    # (B, C, o1..od, k1..kd) -> (B, o1..od, C, k1..kd)
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.reshape(-1, conv.weight[0].numel())


def layer_kind(module: nn.Module, leaf: str) -> tuple[str | None, str | None]:
    """``(kind, None)`` for a layer with a matrix view (``"linear"``, ``"transposed"``, ``"conv"``), else
    ``(None, reason)``: why it falls back to magnitude pruning."""
    cls = type(module).__name__
    if leaf != "weight":
        if isinstance(module, nn.RNNBase):
            return None, f"recurrent weight {leaf} of {cls}"
        return None, f"{leaf} of {cls}: a packed projection its module multiplies itself, not a layer"
    if stores_transposed(module):
        return "transposed", None
    if isinstance(module, nn.Linear):
        return "linear", None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None, f"transposed convolution ({cls})"
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return None, f"grouped convolution ({cls} with groups={module.groups})"
        return "conv", None
    if isinstance(module, nn.Bilinear):
        return None, "nn.Bilinear (two inputs)"
    return None, f"{cls} is not nn.Linear, Conv1D or a convolution: its forward is not known"


@dataclass
class Target:
    """One pruned weight: its owner module, matrix view and place in the forward order."""

    name: str
    param: torch.Tensor  # the nn.Parameter (prunable_weights gives it as a Tensor)
    module: nn.Module
    kind: str | None
    reason: str | None = None  # why it falls back to magnitude (kind None)
    order: float = -1.0  # position of its (or its nearest called ancestor's) first call; -1: never called
    calls: int = 0  # calls of the module in the first batch's forward

    @property
    def columns(self) -> int:
        """Input size of the matrix view."""
        return self.param.shape[0] if self.kind == "transposed" else self.param[0].numel()

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """A copy of the weight as ``(out, in)`` in ``dtype``."""
        w = self.param.detach()
        w = w.t() if self.kind == "transposed" else w.reshape(w.shape[0], -1)
        return w.to(dtype=dtype, copy=True)

    def to_param(self, m: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` matrix (weights or mask) back in the parameter's shape."""
        return (m.t() if self.kind == "transposed" else m.reshape(self.param.shape)).contiguous()

    def rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's input ``x`` as ``(tokens, in)`` rows in ``dtype``."""
        x = x.detach().to(dtype)
        if self.kind == "conv":
            return unfold_conv(cast(nn.modules.conv._ConvNd, self.module), x)  # kind "conv": layer_kind saw one
        if x.shape[-1] != self.columns:  # the layer itself would fail: reported as the batch's failure
            raise ValueError(f"{self.name} got inputs of size {x.shape[-1]}, its weight takes {self.columns}")
        return x.reshape(-1, self.columns)


def _targets(model: nn.Module, exclude: Iterable[str]) -> list[Target]:
    try:
        named = prunable_weights(model, exclude)
    except WeightSelectionError as err:
        raise PruningError(str(err)) from None
    if not named:
        raise PruningError("nothing to prune: no conv or linear weights left after exclusions")
    owners = [owner_of(model, name) for name, _ in named]
    return [Target(n, p, m, *layer_kind(m, n.rpartition(".")[2])) for (n, p), m in zip(named, owners)]


def find_block_stack(model: nn.Module, names: Iterable[str]) -> tuple[str, list[nn.Module], list[str]] | None:
    """The model's stack of blocks, ``(module name, blocks, their name prefixes)``, or None (the rule in the
    module docstring). ``names``: the parameter names to be pruned. Ties in length go to the stack holding more
    of them, then to the first in module order."""
    names = list(names)
    best, best_key = None, (0, 0)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.named_children())
        classes = {type(c) for _, c in children}
        if len(children) < 2 or len(classes) != 1 or issubclass(classes.pop(), (nn.ModuleList, nn.Sequential)):
            continue
        prefix = f"{name}." if name else ""
        held = [sum(n.startswith(f"{prefix}{child}.") for n in names) for child, _ in children]
        if min(held) == 0 or 2 * sum(held) < len(names):
            continue
        key = (len(children), sum(held))
        if key > best_key:
            best, best_key = (name, [c for _, c in children], [f"{prefix}{child}." for child, _ in children]), key
    return best


# -- batches and model calls ---------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass early; caught by `_run_model`."""


def materialise_batches(batches, device: torch.device) -> list:
    """The calibration batches as a list of tensors or dicts of tensors on ``device``; else PruningError."""
    if batches is None or isinstance(batches, (torch.Tensor, dict, str)):
        raise PruningError(
            "batches must be an iterable of batches (a list of tensors, or of dicts for a Hugging Face model), "
            f"got a single {type(batches).__name__}; wrap it in a list: [batch]"
        )
    try:
        items = list(batches)
    except TypeError:
        raise PruningError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
    if not items:
        raise PruningError("no calibration batches: pass at least one batch of model inputs")
    out: list[torch.Tensor | dict] = []
    for i, b in enumerate(items):
        if isinstance(b, (tuple, list)) and b:  # an (inputs, targets) pair, as recalibrate_bn takes
            b = b[0]
        if isinstance(b, torch.Tensor):
            if b.numel() == 0:
                raise PruningError(f"calibration batch {i} is empty (shape {tuple(b.shape)}); drop it")
            out.append(b.to(device))
        elif isinstance(b, dict):
            tensors = [v for v in b.values() if isinstance(v, torch.Tensor)]
            if not tensors or any(v.numel() == 0 for v in tensors):
                raise PruningError(f"calibration batch {i} is an empty dict or holds an empty tensor; drop it")
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            out.append({**b, "use_cache": False} if "use_cache" in b else b)  # a cache would grow with every run
        else:
            kind = type(b).__name__
            raise PruningError(f"calibration batch {i} is a {kind}; pass tensors or dicts of tensors (model(**batch))")
    return out


def _guarded(fn, index: int, pruned: int):
    """``fn()``: a forward of calibration batch ``index``; a model refusing its input is one PruningError line."""
    try:
        return fn()
    except (_Stop, PruningError):  # and a signal's exception (not caught below): not the input's fault
        raise
    except MODEL_INPUT_ERRORS as err:
        if is_out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise PruningError(
            f"the model cannot run on calibration batch {index} ({type(err).__name__}: {first}); pass inputs "
            "it accepts: tensors for model(x), dicts of tensors for model(**batch), on the model's device"
            + (f"; {pruned} tensors were pruned before it: reload the model" if pruned else "")
        ) from None


def _run_model(model: nn.Module, batch, index: int, passes: dict, pruned: int = 0) -> None:
    passes["model"] += 1
    with contextlib.suppress(_Stop):
        _guarded(lambda: model(**batch) if isinstance(batch, dict) else model(batch), index, pruned)


@contextlib.contextmanager
def _hooked(pairs):
    """Forward pre-hooks (with kwargs) installed for the duration of the block: ``[(module, hook)]``."""
    handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _input_of(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise PruningError("a pruned layer was called without a tensor input")


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def _main_out(out):
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _slot_of(value, args, kwargs):
    slots = [("arg", j) for j, a in enumerate(args) if a is value] + [
        ("kw", k) for k, v in kwargs.items() if v is value
    ]
    return slots[0] if slots else None


def _with_slot(args, kwargs, slot, value):
    args, kwargs = list(args), dict(kwargs)
    if slot[0] == "arg":
        args[slot[1]] = value
    else:
        kwargs[slot[1]] = value
    return args, kwargs


def _chain_slot(records: list[dict]):
    """The slot (``("arg", j)`` or ``("kw", key)``) carrying the hidden state, if the blocks form a chain."""
    if any(r["calls"] != 1 for r in records):
        return None
    if any(a["first"] >= b["first"] for a, b in itertools.pairwise(records)):
        return None
    slot = None
    for prev, rec in itertools.pairwise(records):
        h = _main_out(prev["out"])
        s = _slot_of(h, rec["args"], rec["kwargs"]) if h is not None else None
        if s is None or (slot is not None and s != slot):
            return None
        slot = s
    assert slot is not None  # two or more blocks (find_block_stack): the loop above set it
    first = records[0]
    if (slot[0] == "arg" and len(first["args"]) <= slot[1]) or (slot[0] == "kw" and slot[1] not in first["kwargs"]):
        return None
    for rec in records[1:]:  # every other argument as the first block's
        a0, k0 = _with_slot(first["args"], first["kwargs"], slot, None)
        a1, k1 = _with_slot(rec["args"], rec["kwargs"], slot, None)
        if not (_same(a0, a1) and _same(k0, k1)):
            return None
    return slot


def _order_pass(model, batch, targets, stack, passes):
    """One forward of ``batch``: each target's order and call count, and the blocks' chain slot (or None)."""
    counter = itertools.count()
    first: dict[int, int] = {}
    calls: dict[int, int] = {}
    records: list[dict] = [{"calls": 0, "first": -1, "args": (), "kwargs": {}, "out": None} for _ in (stack or [])]
    handles = []

    def pre(module, args):
        calls[id(module)] = calls.get(id(module), 0) + 1
        first.setdefault(id(module), next(counter))

    def block_pre(i):
        def hook(module, args, kwargs):
            records[i].update(calls=records[i]["calls"] + 1, first=first[id(module)], args=args, kwargs=kwargs)

        return hook

    def block_post(i):
        def hook(module, args, out):
            records[i]["out"] = out

        return hook

    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre))
        for i, block in enumerate(stack or []):
            handles.append(block.register_forward_pre_hook(block_pre(i), with_kwargs=True))
            handles.append(block.register_forward_hook(block_post(i)))
        _run_model(model, batch, 0, passes)
    finally:
        for h in handles:
            h.remove()
    names = dict((id(m), n) for n, m in model.named_modules())
    positions = {names[k]: v for k, v in first.items() if k in names}
    for t in targets:
        t.calls = calls.get(id(t.module), 0)
        owner = t.name.rpartition(".")[0]
        while owner not in positions and owner:  # a never-called layer goes where its nearest called ancestor is
            owner = owner.rpartition(".")[0]
        t.order = positions.get(owner, -1)
    return _chain_slot(records) if stack else None


# -- the driver ----------------------------------------------------------------------------------

NewStats = Callable[[Target], object]  # returns an object with .add(rows) for the (tokens, in) input rows
PruneLayer = Callable[[Target, Any], tuple[torch.Tensor, torch.Tensor | None]]  # (keep, new weights or None)


def _magnitude_keep(t: Target, setting: Setting) -> tuple[torch.Tensor, bool]:
    p = t.param.detach()
    if setting.nm:  # grouped along the input dimension: a Conv1D's first
        view = p.t() if stores_transposed(t.module) else p
        masks, skipped = nm_masks([(t.name, view)], *setting.nm)
        return (masks[t.name].t().contiguous() if view is not p else masks[t.name]), bool(skipped)
    assert setting.sparsity is not None  # a Setting holds a sparsity or an N:M pattern (Setting.of)
    flat = p.reshape(-1).abs().to(compute_dtype(p))
    return keep_mask_topk(flat, round(setting.sparsity * flat.numel())).view(p.shape), False


class _Run:
    """The state of one calibrated pruning run."""

    def __init__(self, model, batches, setting, new_stats, prune_layer):
        self.model, self.batches, self.setting = model, batches, setting
        self.new_stats, self.prune_layer = new_stats, prune_layer
        self.masks: dict[str, torch.Tensor] = {}
        self.fallback: dict[str, str] = {}
        self.skipped: list[str] = []
        self.passes = {"model": 0, "block": 0}

    @property
    def changed(self) -> int:
        return len(self.masks) - len(self.skipped)

    def run_block(self, block: nn.Module, args, kwargs, index: int):
        self.passes["block"] += 1
        return _guarded(lambda: block(*args, **kwargs), index, self.changed)

    def prune(self, t: Target, stats=None) -> None:
        """Prune one target in place: by the pruner from ``stats``, or by magnitude if it falls back."""
        if t.kind is not None and getattr(stats, "tokens", 0) == 0:  # never prune from empty statistics
            t.kind, t.reason = None, "not called in the calibration passes (a fused fast path may bypass it)"
        if t.kind is None:
            keep, skipped = _magnitude_keep(t, self.setting)
            if skipped:
                self.skipped.append(t.name)
            else:
                assert t.reason is not None  # layer_kind, or the checks that set kind None, give the reason
                self.fallback[t.name] = t.reason
        else:
            keep, new = self.prune_layer(t, stats)
            keep = t.to_param(keep)
            if new is not None:
                t.param.copy_(t.to_param(new))
        t.param.masked_fill_(~keep, 0.0)
        self.masks[t.name] = keep

    def hooks(self, targets: list[Target], stop: bool) -> tuple[dict[str, object], list, list[int]]:
        """``(stats, [(module, pre-hook)], call count)``: hooks feeding every target's input rows to its
        statistics; ``stop``: end the forward at the target's last call (for one target)."""
        stats = {t.name: self.new_stats(t) for t in targets}
        count = [0]

        def hook_for(t):
            dtype = compute_dtype(t.param)

            def hook(module, args, kwargs):
                stats[t.name].add(t.rows(_input_of(args, kwargs), dtype))
                count[0] += 1
                if stop and count[0] >= t.calls:
                    raise _Stop

            return hook

        return stats, [(t.module, hook_for(t)) for t in targets], count

    def layer_by_layer(self, targets: list[Target]) -> None:
        for t in targets:
            if t.kind is None:
                self.prune(t)
                continue
            stats, hooks, count = self.hooks([t], stop=True)
            with _hooked(hooks):
                for i, batch in enumerate(self.batches):
                    count[0] = 0
                    _run_model(self.model, batch, i, self.passes, self.changed)
            self.prune(t, stats[t.name])

    def capture(self, block: nn.Module) -> list[tuple[tuple, dict]]:
        inputs = []

        def hook(module, args, kwargs):
            inputs.append((args, kwargs))
            raise _Stop

        with _hooked([(block, hook)]):
            for i, batch in enumerate(self.batches):
                _run_model(self.model, batch, i, self.passes, self.changed)
        return inputs

    def block_by_block(self, blocks, block_targets, slot, inputs) -> None:
        for b, (block, targets) in enumerate(zip(blocks, block_targets)):
            stats, hooks, _ = self.hooks([t for t in targets if t.kind is not None], stop=False)
            with _hooked(hooks):
                for i, (args, kwargs) in enumerate(inputs):
                    self.run_block(block, args, kwargs, i)
            for t in targets:
                self.prune(t, stats.get(t.name))
            if b < len(blocks) - 1:
                outs = []
                for i, (args, kwargs) in enumerate(inputs):
                    outs.append(_with_slot(args, kwargs, slot, _main_out(self.run_block(block, args, kwargs, i))))
                inputs = outs


def prune_sequentially(
    model: nn.Module,
    batches,
    setting: Setting,
    exclude: Iterable[str],
    new_stats: NewStats,
    prune_layer: PruneLayer,
) -> PruneResult:
    """Calibrate and prune every prunable weight (minus ``exclude``) in place, sequentially.

    ``new_stats(target)`` makes a layer's statistics (an object with ``add(rows)``, fed ``(tokens, in)``
    input rows in float32, float64 for a float64 weight, and ``tokens``, the rows seen: a layer with none
    falls back to magnitude); ``prune_layer(target, stats)`` returns the ``(out, in)`` keep-mask and the
    updated ``(out, in)`` weights or None (no update). Pruned entries are
    set to +0.0. The model runs in eval mode under ``torch.no_grad()``; every module's mode (and a Hugging
    Face ``config.use_cache``) is restored afterwards, also on error.
    """
    targets = _targets(model, exclude)
    batches = materialise_batches(batches, targets[0].param.device)
    run = _Run(model, batches, setting, new_stats, prune_layer)
    if setting.nm:  # N:M layers whose input size is not a multiple of M stay dense
        m = setting.nm[1]
        for t in targets:
            if t.kind is not None and t.columns % m:
                run.masks[t.name] = torch.ones(t.param.shape, dtype=torch.bool, device=t.param.device)
                run.skipped.append(t.name)
        targets = [t for t in targets if t.name not in run.masks]
    modes = [(m, m.training) for m in model.modules()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    found = find_block_stack(model, [t.name for t in targets])
    stack_name, stack, prefixes = found if found else (None, None, None)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)  # fused encoder layers would bypass their Linears' hooks
        if config is not None and use_cache:  # use_cache is only set where there is a config
            config.use_cache = False
        with torch.no_grad():
            slot = _order_pass(model, batches[0], targets, stack, run.passes)
            for t in targets:
                if t.kind is not None and t.calls == 0:
                    t.kind, t.reason = None, "never called in a forward pass (e.g. nn.MultiheadAttention's out_proj)"
            targets.sort(key=lambda t: t.order)  # stable: ties keep prunable_weights order
            if slot is None:
                stack_name = None
                run.layer_by_layer(targets)
            else:
                assert stack is not None and prefixes is not None  # _order_pass finds a chain only in a stack
                inside = [[t for t in targets if t.name.startswith(p)] for p in prefixes]
                in_stack = {t.name for ts in inside for t in ts}
                start = min(t.order for ts in inside for t in ts if t.order >= 0)
                outside = [t for t in targets if t.name not in in_stack]
                run.layer_by_layer([t for t in outside if t.order < start])
                inputs = run.capture(stack[0])
                run.block_by_block(stack, inside, slot, inputs)
                run.layer_by_layer([t for t in outside if t.order >= start])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training
        if config is not None and use_cache:
            config.use_cache = use_cache
    order = {name: i for i, (name, _) in enumerate(prunable_weights(model, exclude))}
    masks = dict(sorted(run.masks.items(), key=lambda kv: order[kv[0]]))
    return PruneResult(
        masks,
        fallback=run.fallback,
        skipped=sorted(run.skipped, key=order.__getitem__),  # skipped names are masks' names: all in order
        mode="blocks" if stack_name is not None else "layers",
        stack=stack_name,
        passes=run.passes,
    )
