"""A GGUF file (llama.cpp's single-file format) turned into a Hugging Face model folder varprune can load.

transformers reads GGUF through the ``gguf`` package (``from_pretrained(dir, gguf_file=NAME)``): the
quantized blocks are dequantized to float32 and the tokenizer is rebuilt from the file's metadata. Such a
model refuses ``save_pretrained`` ("quantized with gguf and is not serializable") while it still carries
the GGUF quantizer, although its weights are plain float tensors by then: :func:`convert_gguf` drops the
quantizer and ``quantization_config`` and saves an ordinary folder (config.json, model.safetensors,
tokenizer files). Nothing is requantized and nothing is downloaded.

What the dequantized weights are: a Q4_1 file keeps, for each block of 32 weights, a scale and a minimum
and a 4-bit code, so each block holds at most 16 distinct values. Magnitudes tie massively (SmolLM2-135M:
106M prunable weights, 3.5M distinct magnitudes), and which of two equal weights magnitude pruning removes
is a convention (docs/pruning.md): results on such a model carry that caveat.

The folder is written as a hidden sibling and renamed into place, so a reader sees none or all of it; an
existing folder is never replaced. The memory needed (the float32 weights, twice at the peak of saving)
is counted from the file's tensor shapes before anything is dequantized.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from varprune.storage.files import file_digest

GGUF_MAGIC = b"GGUF"
PROVENANCE = "varprune-gguf.json"  # written beside the weights: where the folder came from


class GGUFError(ValueError):
    """A GGUF file cannot be converted (missing, not GGUF, too large, the gguf package absent)."""


def gguf_parameters(path: Path) -> tuple[int, str]:
    """(number of weights, architecture) read from the file's header through the ``gguf`` package's
    memory-mapped reader: shapes only, nothing dequantized."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install gguf (or varprune[demo-llm])") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, ... on a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:100]})") from None
    count = 0
    for t in reader.tensors:
        n = 1
        for d in t.shape:
            n *= int(d)
        count += n
    arch = "unknown"
    field = reader.fields.get("general.architecture")
    if field is not None and field.data:
        arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return count, arch


def check_gguf_file(path: Path) -> None:
    """One-line refusals for a path that is not a GGUF file."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file; give the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def convert_gguf(
    path: str | os.PathLike, out_dir: str | os.PathLike, available_bytes: int | None = None, log=print
) -> dict:
    """Dequantize the GGUF file ``path`` into a new Hugging Face folder ``out_dir`` (float32 safetensors,
    its tokenizer); returns the provenance written to ``out_dir/varprune-gguf.json``: the source file,
    its sha256, the weight count, the architecture and what was done. ``available_bytes``: refuse,
    before dequantizing, a model whose float32 weights (twice, at the peak of saving) would not fit."""
    path, out = Path(path), Path(out_dir)
    check_gguf_file(path)
    if out.exists():
        raise GGUFError(f"{out} already exists; give a new folder (or delete that one to convert again)")
    count, arch = gguf_parameters(path)
    need = 2 * 4 * count
    if available_bytes is not None and need > available_bytes:
        raise GGUFError(
            f"{path}: {count:,} weights need about {need / 2**30:.1f} GiB as float32 while converting, more than "
            f"the {available_bytes / 2**30:.1f} GiB available"
        )
    try:
        import transformers
    except ImportError:
        raise GGUFError("converting a GGUF file needs transformers: pip install varprune[hf]") from None
    log(f"converting {path.name} ({arch}, {count / 1e6:.1f}M weights) to float32 in {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model, tokenizer = _load(transformers, path)
        quant = getattr(model.config, "quantization_config", None)
        # the weights are float tensors already; only the quantizer's bookkeeping blocks save_pretrained
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with _quiet(transformers):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(path.resolve()),
            "source_sha256": file_digest(path),
            "architecture": arch,
            "weights": count,
            "dtype": "float32",
            "what_was_done": (
                "loaded with transformers' GGUF reader (dequantized to float32), the GGUF quantizer and "
                "quantization_config removed, saved with save_pretrained; nothing requantized"
            ),
            "quantization": quant.to_dict() if quant is not None and hasattr(quant, "to_dict") else None,
            "transformers": transformers.__version__,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"wrote {out} ({size / 2**20:.0f} MB; delete it to free the space, the next use converts again)")
    return provenance


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' progress bars, advice and warnings kept off the terminal (a failure still raises)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if progress:
            transformers.utils.logging.enable_progress_bar()


def _load(transformers, path: Path):
    """The model (float32) and tokenizer from the GGUF file, quietly; a failure is translated into one line."""
    try:
        with _quiet(transformers):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent),
                gguf_file=path.name,
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # no raise pointing at a report nobody sees: read below instead
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as e:
        raise GGUFError(
            f"{path}: transformers could not read it ({str(e).strip().splitlines()[0][:160]}); it reads the GGUF "
            f"architectures and quantization types it lists in its GGUF documentation"
        ) from None
    # a weight the file lacks is initialised randomly by transformers, with only a log line (silenced above): a
    # GGUF without its layers would otherwise convert into a folder of random weights
    mismatched = [k for k in info.get("mismatched_keys", ()) if isinstance(k, (tuple, list)) and len(k) == 3]
    if mismatched:
        name, have, want = mismatched[0]
        raise GGUFError(
            f"{path}: {name} has shape {list(have)} in the file but {list(want)} by its metadata"
            + (f" ({len(mismatched) - 1} more)" if len(mismatched) > 1 else "")
            + "; the file is damaged or its metadata wrong: download it again"
        )
    missing = sorted(k for k in info.get("missing_keys", ()) if isinstance(k, str))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise GGUFError(
            f"{path}: the file lacks {shown} (transformers would initialise them randomly); it is incomplete or "
            f"of another architecture than its metadata says: download it again"
        )
    return model, tokenizer
