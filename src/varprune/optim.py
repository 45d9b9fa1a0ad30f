"""``varprune.optim``: the sharpness- and compression-aware optimizers, under their public name.

They live in :mod:`varprune.numerics.optim` (the numerics any training loop can use); this module keeps
``from varprune.optim import SAM`` working.
"""

from varprune.numerics.optim import S2SAM, SAM, CrAM, frozen_bn_stats, is_two_pass

__all__ = ["S2SAM", "SAM", "CrAM", "frozen_bn_stats", "is_two_pass"]
