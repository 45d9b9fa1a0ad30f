"""Sharded training (``train --fsdp``, FSDP2) under torchrun on the CPU (gloo, 2 processes) against one process.

The end-to-end tests reuse test_distributed's torchrun launcher; the bad-input checks run in this process.
"""

import json
import os
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import PROBE, TINY, assert_close, descendants, one_process, torchrun
from varprune.cli import main
from varprune.engine import memory, sharding
from varprune.engine.config import TrainConfig
from varprune.engine.loop import train

WORDS = (
    "the quick brown fox jumps over the lazy dog while a pruned network keeps its accuracy and "
    "the tokenizer learns merges from the training text only; numbers 1234 and 56789 stay digits. "
)
LLAMA = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2)
TEXT = dict(
    dataset="text",
    model="llama",
    seq_len=16,
    vocab_size=280,
    epochs=2,
    batch_size=6,
    limit_train=40,
    limit_test=13,  # 13 test windows: shares of 6 and 7, one batch of 6 on rank 0 and two batches on rank 1
    device="cpu",
    method="var+sam",
    seed=3,
)


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    for k, v in LLAMA.items():
        out += ["--model-arg", f"{k}={v}"]
    return out


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "train.txt").write_text("".join(f"{WORDS} line {i}\n" for i in range(40)))
    (root / "test.txt").write_text(WORDS * 6)
    return root


@pytest.mark.slow
def test_fsdp_text_run_equals_one_process(tmp_path, corpus):
    """A tiny Llama, VAR+SAM, 2 epochs: two sharded processes (activation checkpointing too) end within float32
    noise of one process (same global batch and seed), and rank 0 writes the whole model.safetensors a
    one-process run writes."""
    out = tmp_path / "sharded"
    r = torchrun(
        ["train", *flags(TEXT), "--data-dir", str(corpus), "--quiet", "--fsdp", "--grad-checkpoint", "--out", str(out)]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = TrainConfig(**TEXT, data_dir=str(corpus), model_args=LLAMA)
    train(cfg, tmp_path / "alone", log=lambda *_: None, progress=False)
    mine, alone = load_file(out / "model.safetensors"), load_file(tmp_path / "alone" / "model.safetensors")
    assert all(mine[k].dtype == alone[k].dtype and mine[k].shape == alone[k].shape for k in alone)
    assert_close(mine, alone, rel=1e-4)
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ours, theirs):  # the per-layer variances and the test set (evaluated in shares) match too
        assert a["layer_variance"].keys() == b["layer_variance"].keys()
        assert a["test_perplexity"] == pytest.approx(b["test_perplexity"], rel=1e-4)
        assert a["mean_layer_variance"] == pytest.approx(b["mean_layer_variance"], rel=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["fsdp"] is True and config["resolved"]["test_examples"] == 13


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_equals_uninterrupted(tmp_path, fmnist_dir):
    """An image MLP sharded layer by layer, VAR: killed after its first checkpoint, resumed under torchrun (the
    checkpoint is whole, cut again on loading), it ends where one uninterrupted process ends."""
    out = tmp_path / "run"
    epochs, more = 3, dict(lr=0.02, limit_train=256, method="var", var_lambda=1e-4, model_args={"width": 64})
    args = ["train", "--out", str(out), "--epochs", str(epochs), *TINY, "--lr", "0.02", "--limit-train", "256"]
    args += ["--method", "var", "--var-lambda", "1e-4", "--model-arg", "width=64", "--fsdp"]
    job = torchrun(args, script=PROBE, env={"PROBE_SLOW": "0.05"}, popen=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.safetensors").exists():
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for pid in [*descendants(job.pid), job.pid]:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not (out / "model.safetensors").exists(), "the job finished before it could be killed"
    shutil.copytree(out, tmp_path / "copy")
    r = torchrun(["train", "--resume", str(out), "--quiet"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming" in r.stdout
    alone = one_process(tmp_path / "alone", epochs=epochs, **more)
    assert_close(load_file(out / "model.safetensors"), alone)
    # the whole checkpoint is the one-process format: `train --resume` without torchrun continues it unsharded
    assert main(["train", "--resume", str(tmp_path / "copy"), "--quiet"]) == 0
    assert_close(load_file(tmp_path / "copy" / "model.safetensors"), alone)


def test_fsdp_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    base = ["train", "--out", str(out), "--model", "mlp", "--device", "cpu"]
    assert main([*base, "--fsdp"]) == 2  # no torchrun
    assert "--fsdp shards the model over the processes torchrun starts" in capsys.readouterr().err
    assert main([*base, "--grad-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "--grad-checkpoint: --model mlp has no activation checkpointing" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([*base, "--fsdp", "--method", "sam", "--sam-local", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "--sam-local perturbs with each process's gradient" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_fsdp_units_and_the_sharded_memory_estimate():
    cfg = TrainConfig(model="mlp", fsdp=True)
    assert sharding.model_problem(cfg, torch.nn.Linear(3, 4), text=False).startswith("--fsdp: --model mlp has no")
    from varprune.models import create_model

    with torch.device("meta"):
        llama = create_model("llama", vocab_size=280, max_positions=16, **LLAMA)
    blocks = sharding.units(llama, text=True)
    assert blocks is not None and len(blocks) == 2 and blocks[0] is llama.model.layers[0]
    assert sharding.model_problem(TrainConfig(model="llama", fsdp=True, grad_checkpoint=True), llama, True) is None
    example = torch.zeros((1, 16), dtype=torch.long, device="meta")
    whole = memory.estimate(llama, example, 8, "adamw", "sgd", 0)
    split = memory.estimate(llama, example, 8, "adamw", "sgd", 0, shards=4, units=blocks)
    largest = sum(p.numel() for p in blocks[0].parameters())
    assert split.parameters == -(-whole.parameters // 4) + 4 * 2 * largest
    assert split.activations == pytest.approx(whole.activations / 4)  # a quarter of the global batch each
    checkpointed = memory.estimate(llama, example, 8, "adamw", "sgd", 0, units=blocks, checkpointed=True)
    assert checkpointed.activations < whole.activations
    assert "divided by 4 (--fsdp)" in split.describe("cuda:0")
