"""Numerics: tensors and modules in, tensors out; usable from any training loop.

* weights.py        the one definition of prunable weights
* regularizers.py   VAR, l1, Hoyer-square: an autograd penalty and a closed-form gradient each
* optim.py          SAM/ASAM, CrAM/CrAM+, S2-SAM (torch.optim shape, wrap any base optimizer)
* pruning.py        magnitude masks (global / layer-wise, exact top-k), N:M masks, BN re-tuning
* masking.py        MaskKeeper: pruned weights stay zero through any optimizer
* wanda.py          Wanda (|W| x ||X||, per output row); sparsegpt.py: SparseGPT (OBS updates); both driven by
                    calibration.py (sequential calibration, block by block or layer by layer)
* pruners.py        the registry of one-shot pruners (magnitude, wanda, sparsegpt) the sweep and export use
* metrics.py        Dice, IoU, pixel accuracy; hessian.py: flatness; sensitivity.py: per-layer analysis numbers

Nothing here imports the engine, the command line or the data.
"""
