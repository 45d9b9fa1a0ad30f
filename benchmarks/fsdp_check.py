"""Sharded training (FSDP2) end to end, for benchmarks/gpu_check.sh's ``fsdp`` part; runs on the CPU too.

1. ``torchrun -m varprune train --fsdp`` on a tiny Llama (VAR, 2 epochs) against one process with the same global
   batch and seed: the largest relative difference of model.safetensors' tensors. On the CPU (gloo, fp32) it
   must be float32 noise (<= 1e-4); on GPUs the sharded run computes in bf16 (MixedPrecisionPolicy), so the
   one-process run uses --amp bf16 and the bound is 5e-2. Needs 2 processes: with one GPU the check runs on
   the CPU (gloo) and says so.
2. The Hugging Face Trainer with accelerate's FSDP2 (``fsdp_config={"version": 2}``) and VarCallback against
   one process's plain loop adding ``reg()`` to the loss (fp32, every GPU; accelerate enables FSDP on
   accelerators only, so this part is skipped on the CPU).

    python benchmarks/fsdp_check.py [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the quick brown fox jumps over the lazy dog while a pruned network keeps its accuracy and "
    "the tokenizer learns merges from the training text only; numbers 1234 and 56789 stay digits. "
)
LLAMA = ["--model", "llama", "--model-arg", "num_hidden_layers=2", "--model-arg", "hidden_size=32"]
LLAMA += ["--model-arg", "intermediate_size=48", "--model-arg", "num_attention_heads=2"]
LR, STEPS, BATCH = 0.1, 3, 4


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str], env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port())]
    full = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run(cmd + args, env=full, capture_output=True, text=True, timeout=400)


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(
        float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-12)) for k in a
    )


def cli_check(tmp: Path) -> dict:
    from safetensors.torch import load_file

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus >= 2 else "cpu"
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("".join(f"{WORDS} line {i}\n" for i in range(80)))
    (corpus / "test.txt").write_text(WORDS * 6)
    args = ["train", "--dataset", "text", "--data-dir", str(corpus), *LLAMA, "--seq-len", "16", "--vocab-size", "280"]
    # 64 windows: 8 whole global batches (a last partial batch is dropped differently by 1 and 2 processes)
    args += ["--epochs", "2", "--batch-size", "8", "--limit-train", "64", "--method", "var", "--device", device]
    args += [
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--quiet",
        "--seed",
        "3",
    ]  # AdamW amplifies rounding (sign-like steps)
    amp = ["--amp", "bf16"] if device == "cuda" else []
    n = min(gpus, 8) if device == "cuda" else 2
    sharded = torchrun(n, ["-m", "varprune", *args, *amp, "--fsdp", "--grad-checkpoint", "--out", str(tmp / "s")])
    if sharded.returncode != 0:
        return {"status": "failed", "log": (sharded.stdout + sharded.stderr)[-2000:]}
    one = subprocess.run(
        [sys.executable, "-m", "varprune", *args, *amp, "--out", str(tmp / "o")], capture_output=True, text=True
    )
    if one.returncode != 0:
        return {"status": "failed", "log": (one.stdout + one.stderr)[-2000:]}
    diff = rel_diff(load_file(tmp / "o" / "model.safetensors"), load_file(tmp / "s" / "model.safetensors"))
    bound = 5e-2 if device == "cuda" else 1e-4
    note = "" if device == "cuda" or gpus == 0 else f" (on the CPU: {gpus} GPU, --fsdp needs 2 processes)"
    return {"status": "ok", "device": device, "processes": n, "max_rel_diff": diff, "bound": bound,
            "verdict": "PASS" if diff <= bound else "FAIL", "note": note}  # fmt: skip


def tiny_gpt2():
    from varprune.models import create_model

    torch.manual_seed(0)
    return create_model(
        "gpt2", vocab_size=100, max_positions=16, n_layer=2, n_embd=32, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def tokens():
    return torch.randint(0, 100, (BATCH * STEPS, 16), generator=torch.Generator().manual_seed(1))


def hf_worker(out: str) -> None:
    """Under torchrun: the Trainer with FSDP2 and VarCallback; rank 0 saves the whole state."""
    import transformers

    from varprune.engine.sharding import full_state
    from varprune.integrations.hf import VarCallback

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    data, share = tokens(), BATCH // int(os.environ["WORLD_SIZE"])

    class Shares(torch.utils.data.Dataset):  # each process its contiguous share of every global batch, in order
        def __init__(self):
            self.rows = [s * BATCH + rank * share + j for s in range(STEPS) for j in range(share)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": data[self.rows[i]], "labels": data[self.rows[i]]}

    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    args = transformers.TrainingArguments(
        output_dir=str(Path(out).parent / "trainer"), per_device_train_batch_size=share, max_steps=STEPS,
        max_grad_norm=0.0, report_to="none", save_strategy="no", disable_tqdm=True,
        fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]},
    )  # fmt: skip
    callback = VarCallback(strength=1.0)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Shares(),
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)), callbacks=[callback],
    )  # fmt: skip
    trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(Shares(), batch_size=share)  # no resharding
    trainer.train()
    sharded = type(trainer.model.transformer.h[0].attn.c_attn.weight).__name__
    state = full_state(trainer.model.state_dict())
    if rank == 0:
        torch.save({"state": state, "parameter_type": sharded, "world": world}, out)


def hf_check(tmp: Path) -> dict:
    if torch.cuda.device_count() == 0:
        return {"status": "skipped", "note": "accelerate enables FSDP on accelerators only"}
    from varprune.numerics.regularizers import VarRegularizer

    out = tmp / "hf.pt"
    r = torchrun(min(torch.cuda.device_count(), 8), [__file__, "--hf-worker", str(out)])
    if r.returncode != 0:
        return {"status": "failed", "log": (r.stdout + r.stderr)[-2000:]}
    got = torch.load(out)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = copy.deepcopy(tiny_gpt2()).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    var = VarRegularizer.from_strength(model, 1.0)
    data = tokens().cuda()
    for s in range(STEPS):
        x = data[s * BATCH : (s + 1) * BATCH]
        loss = model(input_ids=x, labels=x).loss + var()
        opt.zero_grad()
        loss.backward()
        opt.step()
    diff = rel_diff({k: v.cpu() for k, v in model.state_dict().items()}, got["state"])
    return {"status": "ok", "processes": got["world"], "parameter_type": got["parameter_type"],
            "max_rel_diff": diff, "bound": 1e-4, "verdict": "PASS" if diff <= 1e-4 else "FAIL"}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_worker:
        hf_worker(a.hf_worker)
        return 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "cli").mkdir()
        (tmp / "hf").mkdir()
        result = {"cli": cli_check(tmp / "cli"), "hf": hf_check(tmp / "hf")}
    for name, r in result.items():
        if r.get("verdict"):
            where = f"bound {r['bound']:g}, {r.get('processes')} processes{r.get('note', '')}"
            print(f"JUDGED fsdp {name}: max relative difference {r['max_rel_diff']:.2e} vs one process ({where}): "
                  f"{r['verdict']}")  # fmt: skip
        else:
            print(f"fsdp {name}: {r['status']} {r.get('note', '')} {r.get('log', '')}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    good = all(r["status"] in ("ok", "skipped") and r.get("verdict", "PASS") == "PASS" for r in result.values())
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
