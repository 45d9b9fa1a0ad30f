"""One-shot magnitude pruning (global, layer-wise, N:M) and BatchNorm re-tuning.

Protocol (CrAM convention, docs/background.md): global unstructured
magnitude pruning over every prunable weight (first conv and classifier
included), or layer-wise uniform pruning; sparsity is counted over the pruned
tensors only. Ties are broken by position so that the number of removed
weights is exactly ``round(sparsity * n)``: among equal magnitudes the earlier
(in ``prunable_weights`` order, then row-major order inside a tensor) is
pruned first. These are exactly the masks of a stable argsort of the
magnitudes, without paying for one.

How the masks are found. Non-negative IEEE floats order like their bit
patterns read as integers, so the magnitudes are viewed as int32 (int64 for
float64) and compared as integers:

* `MagnitudePruner` (a sweep over sparsities) sorts the bit patterns
  once, values only (an integer sort: radix on CPU and CUDA), and reads every
  sparsity's mask as one comparison with the k-th value;
* `keep_mask_topk` (one mask, e.g. CrAM's every step) finds the k-th
  value on CPU by a histogram radix-select (a 16-bit then a 15-bit digit: two
  ``bincount`` passes, the second over the few candidates left), and on other
  devices from an integer sort without a host synchronisation.

Only where equal magnitudes straddle the cut is position consulted: the
earliest of the values equal to the k-th one are pruned, so that exactly k are.

N:M semi-structured masks (`nm_masks`, `prune_nm`) keep the N
largest magnitudes in every group of M consecutive weights along the input
dimension; they have no sparsity knob, so they are separate functions rather
than a mode of `MagnitudePruner`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from varprune.numerics.weights import prunable_weights

SCOPES = ("global", "layerwise")

__all__ = [
    "SCOPES",
    "MagnitudePruner",
    "PruneResult",
    "PruningError",
    "batchnorm_layers",
    "check_sparsity",
    "keep_mask_topk",
    "magnitude_bits",
    "nm_masks",
    "owner_of",
    "parse_pattern",
    "prune_magnitude",
    "prune_nm",
    "realised_sparsity",
    "recalibrate_bn",
    "sparsity_of",
    "stores_transposed",
]


class PruningError(ValueError):
    """A pruning request that cannot be honoured (bad sparsity, pattern, scope, NaN weights)."""


def check_sparsity(sparsity: float) -> float:
    """``float(sparsity)`` if it lies in [0, 1); else `PruningError`."""
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise PruningError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


# -- selection on integer bit patterns -----------------------------------------------------------

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}
# radix-select digits (shift, width) covering the value bits below the sign bit, most significant first
_DIGITS = {torch.int32: ((15, 16), (0, 15)), torch.int64: ((47, 16), (31, 16), (15, 16), (0, 15))}


def _magnitude_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    # float64 when any tensor is float64 (exact), else float32 (exact for bf16/fp16, order-preserving)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def magnitude_bits(magnitudes: torch.Tensor) -> torch.Tensor:
    """The bit patterns of non-negative float32/float64 values as int32/int64 (a view, no copy).

    For non-negative floats (``abs()`` output, +0.0 included) the integer order
    is the float order, +inf above every finite value and NaN above +inf.
    Other floating dtypes are converted to float32 first (exactly).
    """
    if not magnitudes.is_floating_point():
        raise PruningError(f"magnitudes must be a floating-point tensor, got {magnitudes.dtype}")
    if magnitudes.dtype not in _INT_OF:
        magnitudes = magnitudes.float()
    return magnitudes.contiguous().view(_INT_OF[magnitudes.dtype])


def _canonical_zero(bits: torch.Tensor) -> torch.Tensor:
    """-0.0's bit pattern (the sign bit alone, the integer minimum) as +0.0's: a magnitude of -0.0 is zero."""
    return torch.where(bits == torch.iinfo(bits.dtype).min, torch.zeros((), dtype=bits.dtype, device=bits.device), bits)


def _mask_at(
    bits: torch.Tensor, kth: int, excess: int, dtype: torch.dtype = torch.bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep ``bits > kth`` and, of the values equal to ``kth``, the last ``excess`` by position."""
    if out is None:
        out = torch.empty(bits.shape, dtype=dtype, device=bits.device)
    # the comparison writes 0/1 straight into the mask's dtype: on CPU cheaper than converting a bool mask
    keep = torch.gt(bits, kth, out=out)
    if excess:  # equal magnitudes straddle the cut: the earliest of them are pruned
        equal = torch.nonzero(bits == kth).squeeze(1)
        keep[equal[equal.numel() - excess :]] = 1
    return keep


def _radix_select(bits: torch.Tensor, k: int, scratch: torch.Tensor | None = None) -> tuple[int, int, int]:
    """The k-th smallest (1-based) of non-negative int bit patterns by histogram passes.

    Returns ``(kth, n_less, n_equal)``: its value and how many entries are
    below it and equal to it. Each pass histograms one digit of the entries
    that share the digits found so far, so only the first pass reads all n.
    ``scratch``: optional tensor like ``bits`` for the first digit (saves a
    large allocation, whose page faults cost more than the pass itself).
    """
    digits = _DIGITS[bits.dtype]
    candidates, kth, n_less = bits, 0, 0
    for i, (shift, width) in enumerate(digits):
        d = torch.bitwise_right_shift(candidates, shift, out=scratch if i == 0 else None)
        if i:
            d &= (1 << width) - 1
        try:
            hist = torch.bincount(d, minlength=1 << width)
        except RuntimeError as err:  # bincount refuses negative entries: a sign bit was set
            raise PruningError("magnitudes must be non-negative (pass abs() of the weights)") from err
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, k - n_less))  # first digit value whose cumulative count reaches k
        if b:
            n_less += int(cum[b - 1])
        kth |= b << shift
        if i == len(digits) - 1:
            return kth, n_less, int(hist[b])
        candidates = candidates[d == b]
    raise AssertionError("unreachable")


def _keep_mask_sorted_nosync(bits: torch.Tensor, sorted_bits: torch.Tensor, k: int) -> torch.Tensor:
    """Same mask as `keep_mask_topk`, from the sorted bit patterns, with no host synchronisation."""
    kth = sorted_bits[k - 1]
    n_less = torch.searchsorted(sorted_bits, kth.reshape(1))
    keep = bits > kth
    equal = bits == kth
    return keep | (equal & (torch.cumsum(equal, 0) > (k - n_less)))


def keep_mask_topk(
    flat_magnitudes: torch.Tensor,
    n_pruned: int,
    *,
    method: str = "auto",
    dtype: torch.dtype = torch.bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask (True = kept) that prunes exactly the ``n_pruned`` smallest of ``flat_magnitudes``.

    ``flat_magnitudes``: a 1-D tensor of non-negative floats (``abs()`` of the
    weights; float32 or float64 are used as they are, other floats as float32).
    Ties are settled by position, the earlier of equal magnitudes pruned
    first, so the mask equals ``keep[argsort(flat, stable=True)[:n_pruned]] =
    False`` bit for bit (NaN counts as larger than +inf; a raw -0.0 is a zero
    like +0.0, on both paths).

    ``method``: ``"radix"`` (histogram radix-select; host syncs; the default
    on CPU), ``"sort"`` (an integer sort, no host sync; the default elsewhere),
    or ``"auto"``. Negative inputs raise `PruningError` with ``"radix"``
    and give a meaningless mask with ``"sort"``: pass magnitudes.

    ``dtype``: the mask's dtype, ``torch.bool`` or a floating dtype (1 kept,
    0 pruned: what a ``mul_`` wants, made without a bool-to-float pass).
    ``out``: optional contiguous 1-D tensor of that dtype and length to write
    the mask into (a caller that selects every step reuses it; on CPU it also
    serves as scratch space when its element size matches the magnitudes').
    """
    if flat_magnitudes.dim() != 1:
        raise PruningError(f"keep_mask_topk takes a 1-D tensor of magnitudes, got shape {tuple(flat_magnitudes.shape)}")
    n, k = flat_magnitudes.numel(), int(n_pruned)
    if not 0 <= k <= n:
        raise PruningError(f"n_pruned must be in [0, {n}], got {n_pruned}")
    if method == "auto":
        method = "radix" if flat_magnitudes.device.type == "cpu" else "sort"
    if method not in ("radix", "sort"):
        raise PruningError(f"unknown selection method {method!r}; choose auto, radix or sort")
    if dtype != torch.bool and not dtype.is_floating_point:
        raise PruningError(f"mask dtype must be torch.bool or a floating dtype, got {dtype}")
    device = flat_magnitudes.device
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    elif out.shape != (n,) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise PruningError(
            f"out must be a contiguous {dtype} tensor of shape ({n},) on {device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if k == 0 or k == n:
        return out.fill_(1 if k == 0 else 0)
    bits = magnitude_bits(flat_magnitudes)
    if method == "sort":  # no host sync: -0.0 made +0.0 on the device, one elementwise pass
        bits = _canonical_zero(bits)
        return out.copy_(_keep_mask_sorted_nosync(bits, torch.sort(bits).values, k))
    scratch = out.view(bits.dtype) if out.element_size() == bits.element_size() else None
    try:
        kth, n_less, n_equal = _radix_select(bits, k, scratch)
    except PruningError:  # a sign bit: -0.0 (zero, canonicalised here only when present) or a negative value
        bits = _canonical_zero(bits)
        if bool((bits < 0).any()):
            raise
        kth, n_less, n_equal = _radix_select(bits, k, None)
    return _mask_at(bits, kth, n_less + n_equal - k, dtype, out)


def _refuse_nan(sorted_bits: torch.Tensor, what: str) -> None:
    # sorted bit patterns of magnitudes: a NaN sorts above +inf (or below 0 if its sign bit survived abs)
    if sorted_bits.numel() == 0:
        return
    inf_bits = int(
        magnitude_bits(
            torch.tensor([float("inf")], dtype=torch.float32 if sorted_bits.dtype == torch.int32 else torch.float64)
        )[0]
    )
    if int(sorted_bits[-1]) > inf_bits or int(sorted_bits[0]) < 0:
        raise PruningError(
            f"cannot prune: {what} holds NaN weights; magnitude pruning needs finite weights "
            f"(check the checkpoint or the training run)"
        )


class MagnitudePruner:
    """Magnitude masks for any sparsity, from one sort of the model's weights.

    The weights are read at construction time: their magnitudes' bit patterns
    are sorted once (values only; an integer sort). ``masks(s)`` and
    ``apply(s)`` then cost one comparison per weight (plus a position pass
    where equal magnitudes straddle the cut). Masks equal those of a stable
    argsort of the magnitudes (earlier of equal magnitudes pruned first).
    Magnitudes are compared in float64 when any pruned tensor is float64
    (per tensor for layer-wise), else in float32.

    Raises `PruningError` for an unknown scope, nothing to prune, or
    NaN weights.
    """

    def __init__(self, model: nn.Module, scope: str = "global", exclude: Iterable[str] = ()):
        if scope not in SCOPES:
            raise PruningError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.scope = scope
        self.named = prunable_weights(model, exclude)
        if not self.named:
            raise PruningError("nothing to prune: no conv or linear weights left after exclusions")
        self.lengths = [p.numel() for _, p in self.named]
        with torch.no_grad():
            if scope == "global":
                dtype = _magnitude_dtype(p for _, p in self.named)
                flat = torch.cat([p.detach().reshape(-1).abs().to(dtype) for _, p in self.named])
                self._bits = [magnitude_bits(flat)]
                what = ["the model"]
            else:
                self._bits = [
                    magnitude_bits(p.detach().reshape(-1).abs().to(_magnitude_dtype([p]))) for _, p in self.named
                ]
                what = [name for name, _ in self.named]
            self._sorted = [torch.sort(b).values for b in self._bits]
        for s, w in zip(self._sorted, what):
            _refuse_nan(s, w)

    @property
    def numel(self) -> int:
        return sum(self.lengths)

    @staticmethod
    def _mask(bits: torch.Tensor, sorted_bits: torch.Tensor, k: int) -> torch.Tensor:
        n = bits.numel()
        if k == 0:
            return torch.ones(n, dtype=torch.bool, device=bits.device)
        kth = sorted_bits[k - 1 : k]
        n_less_equal = int(torch.searchsorted(sorted_bits, kth, right=True))
        return _mask_at(bits, int(kth), n_less_equal - k)

    def masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Boolean keep-masks (True = kept) by parameter name; the weights are not modified."""
        s = check_sparsity(sparsity)
        if self.scope == "global":
            pieces = self._mask(self._bits[0], self._sorted[0], round(s * self.numel)).split(self.lengths)
        else:
            pieces = [self._mask(b, sb, round(s * n)) for b, sb, n in zip(self._bits, self._sorted, self.lengths)]
        return {name: piece.view(p.shape) for (name, p), piece in zip(self.named, pieces)}

    @torch.no_grad()
    def apply(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Zero the pruned weights in place (+0.0, as an exported file stores them); return the keep-masks."""
        masks = self.masks(sparsity)
        apply_masks_(self.named, masks)
        return masks


@torch.no_grad()
def apply_masks_(named, masks: dict[str, torch.Tensor]) -> None:
    """Set every pruned entry (mask False) of the named tensors to +0.0 in place.

    ``masked_fill_`` rather than a multiplication: a pruned negative weight
    becomes +0.0, not -0.0, so the weights the sweep evaluates, an exported
    file and a masked fine-tuning run are bit for bit the same tensors.
    """
    for name, p in named:
        if name in masks:
            p.masked_fill_(~masks[name].to(p.device), 0.0)


class PruneResult(dict):
    """What every public pruning function returns
    ([`prune_magnitude`][varprune.numerics.pruning.prune_magnitude],
    [`prune_wanda`][varprune.numerics.wanda.prune_wanda],
    [`prune_sparsegpt`][varprune.numerics.sparsegpt.prune_sparsegpt]): keep-masks by parameter name (bool,
    True = kept, the parameter's shape and device), a ``dict``, and the record.

    ``realised``: per-tensor realised sparsity; ``realised_sparsity``: over all pruned tensors; ``fallback``:
    {name: reason} of layers pruned by magnitude at the same setting; ``skipped``: N:M layers left dense
    (input size not a multiple of M); ``mode``: ``"blocks"``/``"layers"``; ``stack``: the block stack's name
    or None; ``passes``: {"model": forwards, partial ones included, "block": runs of one block};
    ``damping``: SparseGPT's {name: percdamp used} where more damping than asked for was needed.
    """

    def __init__(self, masks, fallback=None, skipped=None, mode="layers", stack=None, passes=None, damping=None):
        super().__init__(masks)
        self.realised = {name: 1.0 - int(m.sum()) / m.numel() for name, m in masks.items()}
        self.realised_sparsity = realised_sparsity(masks)
        self.fallback, self.skipped, self.damping = dict(fallback or {}), list(skipped or []), dict(damping or {})
        self.mode, self.stack, self.passes = mode, stack, dict(passes or {})


def prune_magnitude(
    model: nn.Module,
    sparsity: float | None = None,
    scope: str = "global",
    exclude: Iterable[str] = (),
    pattern: str | None = None,
) -> PruneResult:
    """Zero the smallest-magnitude weights in place; return keep-masks by name (a
    [`PruneResult`][varprune.numerics.pruning.PruneResult]).

    Exactly one of ``sparsity`` (unstructured) and ``pattern`` (``"N:M"``: keep the N largest of every M consecutive
    weights along the input dimension; tensors whose input size is not a multiple of M stay dense, listed in
    ``result.skipped``), as [`prune_wanda`][varprune.numerics.wanda.prune_wanda] and
    [`prune_sparsegpt`][varprune.numerics.sparsegpt.prune_sparsegpt] take them.
    ``scope="global"`` ranks all prunable weights together; ``"layerwise"`` removes the same fraction from every
    tensor. The realised sparsity over the pruned tensors is ``round(sparsity * n) / n`` (per tensor for
    layer-wise): exactly that many, ties broken by position (the earlier of two equal weights is pruned).
    """
    if (sparsity is None) == (pattern is None):
        got = "both" if sparsity is not None else "neither"
        raise PruningError(
            f"give exactly one of sparsity= (unstructured, e.g. 0.5) or pattern= (N:M, e.g. '2:4'); got {got}"
        )
    if sparsity is None:
        masks, skipped = _prune_nm(model, str(pattern), exclude)
        return PruneResult(masks, skipped=skipped)
    return PruneResult(MagnitudePruner(model, scope, exclude).apply(sparsity))


# -- N:M semi-structured -------------------------------------------------------------------------

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | Sequence[int]) -> tuple[int, int]:
    """``"2:4" -> (2, 4)``: keep N of every M. Requires integers with 0 < N < M.

    A ``(n, m)`` pair is validated the same way. Raises `PruningError`.
    """
    if isinstance(pattern, str):
        match = _PATTERN.match(pattern)
        if not match:
            raise PruningError(f"N:M pattern must look like '2:4' (keep N of every M), got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
    else:
        try:
            n, m = (int(v) for v in pattern)
        except (TypeError, ValueError):
            raise PruningError(f"N:M pattern must be 'N:M' or a pair of integers, got {pattern!r}") from None
    if not 0 < n < m:
        raise PruningError(f"N:M pattern needs 0 < N < M (keep N of every M), got {n}:{m}")
    return n, m


def stores_transposed(module: nn.Module) -> bool:
    """True for a layer whose weight is stored ``(in, out)`` and used as ``x @ W``: transformers' ``Conv1D``.

    Recognised by class name (GPT-2's family), as `varprune.numerics.weights` does, so that
    nothing here imports transformers. Every other prunable weight is ``(out, in, ...)``.
    """
    return type(module).__name__ == "Conv1D"


def owner_of(model: nn.Module, name: str) -> nn.Module:
    """The module that owns parameter ``name`` (``"a.b.weight"`` -> ``model.a.b``)."""
    module_name = name.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


def _select_named(model_or_named, exclude: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named, nn.Module):
        return prunable_weights(model_or_named, exclude)
    named = [(str(name), t) for name, t in model_or_named]
    names = [name for name, _ in named]
    dropped = set()
    for pattern in exclude:
        if pattern == "first" and names:
            dropped.add(names[0])
        elif pattern == "last" and names:
            dropped.add(names[-1])
        else:
            dropped.update(fnmatch.filter(names, pattern))
    return [(name, t) for name, t in named if name not in dropped]


@torch.no_grad()
def _nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.detach().reshape(-1, m).abs()
    groups = groups.to(_magnitude_dtype([groups]))
    if bool(torch.isnan(groups).any()):
        raise PruningError("cannot prune: NaN weights; N:M pruning needs finite weights")
    pruned = torch.argsort(groups, dim=1, stable=True)[:, : m - n]  # the M-N smallest; earlier of ties first
    keep = torch.ones(groups.shape, dtype=torch.bool, device=groups.device)
    keep.scatter_(1, pruned, False)
    return keep.view(weight.shape)


def nm_masks(model_or_named, n: int, m: int, exclude: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """N:M semi-structured keep-masks: ``(masks, skipped)``; the weights are not modified.

    ``model_or_named``: a model (its prunable weights, minus ``exclude``) or
    ``[(name, tensor)]`` pairs (``exclude`` applies to the names: shell
    patterns, ``"first"``, ``"last"``). Each weight is viewed as
    ``weight.reshape(out, -1)`` (a conv's input dimension is in*kh*kw in
    PyTorch's row-major order); every group of ``m`` consecutive entries
    along it keeps its ``n`` largest magnitudes. Given a model, a weight
    stored transposed as ``(in, out)`` (GPT-2's ``Conv1D``, see
    `stores_transposed`) is grouped along its input dimension, which
    is its first; ``(name, tensor)`` pairs carry no module, so they are all
    read as ``(out, in, ...)``. Ties are settled by position
    as in magnitude pruning: of equal magnitudes the earlier is pruned first
    (the later kept). A tensor whose input dimension is not a multiple of
    ``m`` stays dense: its mask is all True (so [`realised_sparsity`][varprune.numerics.pruning.realised_sparsity]
    counts it as dense) and its name is in ``skipped``. Raises
    `PruningError` for a bad pattern or NaN weights.
    """
    n, m = parse_pattern((n, m))
    masks, skipped = {}, []
    named = _select_named(model_or_named, exclude)
    transposed = set()
    if isinstance(model_or_named, nn.Module):
        transposed = {name for name, _ in named if stores_transposed(owner_of(model_or_named, name))}
    for name, w in named:
        if w.dim() < 2:
            raise PruningError(f"N:M pruning needs a weight with an input dimension; {name} has shape {tuple(w.shape)}")
        view = w.t() if name in transposed else w
        fan_in = view[0].numel()
        if fan_in % m:
            masks[name] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            skipped.append(name)
        else:
            try:
                keep = _nm_mask(view, n, m)
            except PruningError as err:
                raise PruningError(f"{err} (in {name})") from None
            masks[name] = keep.t().contiguous() if name in transposed else keep
    return masks, skipped


def prune_nm(
    model: nn.Module, pattern: str | Sequence[int], exclude: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Deprecated (removed in 0.5): ``prune_magnitude(model, pattern="2:4")`` returns the one result type,
    a `PruneResult` (``result.skipped`` the tensors left dense). Applies
    [`nm_masks`][varprune.numerics.pruning.nm_masks] in place (zero the pruned weights) and returns
    ``(masks, skipped)`` as before."""
    import warnings

    warnings.warn(
        "prune_nm is deprecated and will be removed in varprune 0.5: use prune_magnitude(model, pattern='N:M'), "
        "which returns a PruneResult (masks as a dict, result.skipped the tensors left dense)",
        DeprecationWarning,
        stacklevel=2,
    )
    return _prune_nm(model, pattern, exclude)


@torch.no_grad()
def _prune_nm(
    model: nn.Module, pattern: str | Sequence[int], exclude: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    n, m = parse_pattern(pattern)
    masks, skipped = nm_masks(model, n, m, exclude)
    for name, p in prunable_weights(model, exclude):
        p.masked_fill_(~masks[name], 0.0)
    return masks, skipped


def pattern_masks(
    model: nn.Module,
    sparsity: float | None,
    pattern: str = "unstructured",
    scope: str = "global",
    exclude: Iterable[str] = (),
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep-masks (True = kept) for one pruning setting, and the tensors left dense.

    ``pattern`` "unstructured" uses ``sparsity`` and ``scope`` (the sweep's
    protocol); "N:M" keeps the N largest of every M consecutive weights along
    the input dimension (``sparsity`` and ``scope`` unused); tensors whose
    input dimension is not a multiple of M are left dense and listed.
    """
    if pattern == "unstructured":
        if sparsity is None:
            raise PruningError("unstructured pruning needs a sparsity (--sparsity)")
        return MagnitudePruner(model, scope, exclude).masks(sparsity), []
    n, m = parse_pattern(pattern)
    return nm_masks(model, n, m, exclude)


def realised_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of zeros among the masked tensors."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable) -> nn.Module:
    """BatchNorm re-tuning: recompute running statistics for the current weights.

    Resets every BatchNorm's running mean and variance, then runs forward
    passes without gradients with only the BatchNorm layers in train mode and
    ``momentum=None`` (a cumulative average over all batches, so the result
    does not depend on the batch order). ``batches`` yields input tensors or
    ``(inputs, targets)`` pairs. Leaves the model in eval mode.
    """
    layers = batchnorm_layers(model)
    model.eval()
    if not layers:
        return model
    saved = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        for bn, m in zip(layers, saved):
            bn.momentum = m
        model.eval()
    return model


def sparsity_of(model: nn.Module, exclude: Iterable[str] = ()) -> float:
    """Fraction of exact zeros among the prunable weights."""
    named = prunable_weights(model, exclude)
    zeros = sum(int((p == 0).sum()) for _, p in named)
    return zeros / sum(p.numel() for _, p in named)
