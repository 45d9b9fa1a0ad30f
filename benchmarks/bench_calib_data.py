"""``--calib-data`` on a C4-sized JSON-lines file: the references' protocol (one window from one drawn document,
data/calibtext.py) against reading and tokenizing the whole file (what varprune did before 0.3.0's release).

A synthetic shard is written once (``--mb`` megabytes of ``{"text": ..., "url": ..., "timestamp": ...}`` lines, the
layout of C4's files; documents of log-normally distributed length cut from Debian's fortunes, so the words are
real). A byte-level BPE is trained on the fortunes as a run would. Each way runs in a fresh process, which reports
its wall time and its peak resident memory (ru_maxrss), so the two are measured alike; they take turns,
``--repeats`` rounds, median. No target is judged: the figures say what a user of a real shard pays.

    python benchmarks/bench_calib_data.py --mb 400 --samples 128 --seq-len 512 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes")


def fortune_entries() -> list[str]:
    from varprune.data.text import parse_fortunes

    files = [f for f in sorted(FORTUNES.iterdir()) if f.is_file() and not f.suffix]
    return [e for f in files for e in parse_fortunes(f.read_text("utf-8", "replace"))]


def make_shard(path: Path, mb: int, seed: int = 0) -> int:
    """Write about ``mb`` MB of C4-style lines; return the number of documents."""
    entries = fortune_entries()
    rng = random.Random(seed)
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 10**6:
            words = max(5, int(rng.lognormvariate(5.3, 0.9)))  # median ~200 words, a long tail, like C4's pages
            text, count = [], 0
            while count < words:
                e = rng.choice(entries)
                text.append(e)
                count += len(e.split())
            line = json.dumps({"text": "\n".join(text), "url": f"https://example.org/{n}", "timestamp": "2019"})
            f.write(line + "\n")
            size += len(line) + 1
            n += 1
    return n


def measure(way: str, shard: Path, tokenizer: Path, samples: int, seq_len: int) -> dict:
    """In a fresh process: draw the windows one way, report time and peak memory."""
    code = f"""
import json, resource, time, sys
sys.path.insert(0, {str(ROOT / "src")!r})
from varprune.data import load_tokenizer, encode_stream, stream_windows
from varprune.data.calibtext import calibration_windows
from varprune.data.text import read_bytes, decode_utf8
tok = load_tokenizer({str(tokenizer)!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if {way!r} == "documents":
    w = calibration_windows({str(shard)!r}, tok, {samples}, {seq_len}, 8642)
else:  # the whole file: parsed, joined by blank lines, tokenized, windows of the stream
    raw = read_bytes({str(shard)!r}, 6)
    text = "\\n\\n".join(json.loads(l)["text"] for l in decode_utf8(raw, "shard").split("\\n") if l.strip())
    del raw
    w = stream_windows(encode_stream(tok, text), {samples}, {seq_len}, "shard", 8642)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": dt, "peak_mib": peak / 1024, "import_mib": base / 1024, "windows": len(w)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default="/tmp/varprune-bench-calib")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from varprune.data import train_tokenizer

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    shard = folder / f"c4-like-{args.mb}mb.jsonl"
    if not shard.is_file():
        t0 = time.perf_counter()
        docs = make_shard(shard, args.mb)
        print(
            f"wrote {shard}: {docs} documents, {shard.stat().st_size / 1e6:.0f} MB ({time.perf_counter() - t0:.0f} s)"
        )
    tokenizer = folder / f"tokenizer-{args.vocab}.json"
    if not tokenizer.is_file():
        train_tokenizer(fortune_entries(), args.vocab).save(tokenizer)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; {args.samples} windows of {args.seq_len} tokens; "
        f"{shard.stat().st_size / 1e6:.0f} MB shard"
    )
    results: dict[str, list[dict]] = {"documents": [], "whole file": []}
    for _ in range(args.repeats):
        for way in results:  # take turns
            results[way].append(measure(way, shard, tokenizer, args.samples, args.seq_len))
    print("| way | time (median) | peak resident memory | of which imports |")
    print("|---|---:|---:|---:|")
    for way, runs in results.items():
        t = statistics.median(r["seconds"] for r in runs)
        m = statistics.median(r["peak_mib"] for r in runs)
        base = statistics.median(r["import_mib"] for r in runs)
        print(f"| {way} | {t:.1f} s | {m:.0f} MiB | {base:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
