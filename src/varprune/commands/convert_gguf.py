"""``varprune convert-gguf FILE.gguf DIR``: a GGUF file (llama.cpp's format) as a Hugging Face model folder,
so that ``--model hf:DIR`` can train, prune and export it (storage/gguf.py says what is done)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert-gguf",
        help="dequantize a GGUF file into a Hugging Face model folder (float32 safetensors and its tokenizer)",
        epilog="Needs the gguf package (pip install gguf). Nothing is downloaded; the folder is new, never "
        "replaced. Quantized weights stay quantized in value: a Q4 file's blocks hold at most 16 distinct "
        "values, so magnitudes tie (docs/pruning.md).",
    )
    p.add_argument("file", metavar="FILE.gguf")
    p.add_argument("out", metavar="DIR", help="the new model folder")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.device import available_memory
    from varprune.storage.gguf import convert_gguf

    convert_gguf(Path(args.file), Path(args.out), available_bytes=available_memory("cpu"))
    return 0
