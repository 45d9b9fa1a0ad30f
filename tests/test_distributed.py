"""Data-parallel training under torchrun (CPU, gloo, 2 processes) against one process.

The torchrun tests launch ``python -m torch.distributed.run --nproc-per-node 2
--master-port PORT -m varprune ...`` in a subprocess (OMP_NUM_THREADS=1); the
sharding, the loss weights and GlobalBatchNorm's formula are also checked in
this process, where they are cheap.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import varprune
from varprune.cli import main
from varprune.data import DatasetInfo, DeviceLoader
from varprune.engine import distributed
from varprune.engine.config import TrainConfig
from varprune.engine.loop import train
from varprune.tasks import Classification

SRC = Path(varprune.__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("ddp_probe.py")
TINY = [
    "--model",
    "mlp",
    "--limit-train",
    "512",
    "--limit-test",
    "128",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--no-augment",
    "--sync-bn",
    "--quiet",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, script=None, env=None, popen=False, timeout=240):
    """``torchrun --nproc-per-node 2 -m varprune ARGS`` (or SCRIPT ARGS), with a free port, one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += [str(script)] if script else ["-m", "varprune"]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    if popen:
        return subprocess.Popen(
            cmd + list(args),
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(cmd + list(args), env=full_env, capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, deepest first (from /proc)."""
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []
    return [d for c in children for d in descendants(c)] + children


def one_process(out: Path, **kw) -> dict:
    cfg = TrainConfig(
        **{
            **dict(
                model="mlp", limit_train=512, limit_test=128, batch_size=64, device="cpu", augment=False, sync_bn=True
            ),
            **kw,
        }
    )
    train(cfg, out, log=lambda *_: None, progress=False)
    return load_file(out / "model.safetensors")


def assert_close(a: dict, b: dict, rel=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(a[k].double().abs().max().item(), 1e-12)
        diff = (a[k].double() - b[k].double()).abs().max().item()
        assert diff <= rel * scale, f"{k}: max difference {diff:.3g} vs max |w| {scale:.3g}"


# ---------------------------------------------------------------- in this process

INFO = DatasetInfo("t", 1, 6, 3, (0.5,), (0.25,), 1, True, "none")


def loaders(n, batch, world, train=True, augment=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(n)
    aug = Classification(3, crop_pad=1, flip=True).augment if augment else None
    return [
        DeviceLoader(x, y, INFO, batch, train=train, seed=5, augment=aug, rank=r, world=world) for r in range(world)
    ]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_of_a_global_batch_are_one_process_batch(world):
    """Augmented and shuffled, each step's shards (in rank order) are exactly one process's batch."""
    (single,) = loaders(37, 8, 1)
    shards = loaders(37, 8, world)
    one = list(single)
    many = [list(loader) for loader in shards]
    # 37 = 4 x 8 + 5: the last batch is kept unless a process would get fewer than 2 examples
    assert len(one) == 5 and all(len(m) == (5 if 2 * world <= 5 else 4) for m in many)
    for step, (x, y) in enumerate(one[: len(many[0])]):
        assert torch.equal(torch.cat([m[step][0] for m in many]), x)
        assert torch.equal(torch.cat([m[step][1] for m in many]), y)
        sizes = [len(m[step][1]) for m in many]
        assert max(sizes) - min(sizes) <= 1
    # evaluation: each process takes a contiguous share; together, the whole set in order
    (whole,) = loaders(37, 8, 1, train=False)
    parts = loaders(37, 8, world, train=False)
    assert torch.equal(torch.cat([y for p in parts for _, y in p]), torch.cat([y for _, y in whole]))


def test_loss_weights_make_ddp_average_the_global_mean_gradient():
    """DDP averages per-process mean gradients; weighted by loss_weight, that is the global batch's mean."""
    world = 2
    shards = loaders(7, 7, world, augment=False)  # one batch of 7: shares of 3 and 4
    torch.manual_seed(0)
    w = torch.randn(36, 3, dtype=torch.float64)

    def grad(x, y, weight=1.0):
        v = w.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(x.flatten(1).double() @ v, y % 3) * weight
        loss.backward()
        return v.grad

    ((x_all, y_all),) = list(loaders(7, 7, 1, augment=False)[0])
    parts = [next(iter(s)) for s in shards]
    assert [len(y) for _, y in parts] == [3, 4]
    ddp = sum(grad(x, y, s.loss_weight(0)) for (x, y), s in zip(parts, shards)) / world
    unweighted = sum(grad(x, y) for x, y in parts) / world
    torch.testing.assert_close(ddp, grad(x_all, y_all), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(unweighted, grad(x_all, y_all), rtol=1e-6)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4, 4)])
def test_global_batchnorm_is_batchnorm(one_process_group, shape):
    """GlobalBatchNorm's forward, backward and running statistics against torch's BatchNorm, float64."""
    torch.manual_seed(1)
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1]).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    mine = torch.nn.Sequential(ref)
    import copy

    mine = distributed.convert_sync_bn(copy.deepcopy(mine), torch.device("cpu"))
    assert isinstance(mine[0], distributed.GlobalBatchNorm)
    for _ in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        target = torch.randn(shape, dtype=torch.float64)
        ((ref(x) - target) ** 3).sum().backward()
        ((mine(x2) - target) ** 3).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad)
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(mine[0].state_dict()[name], t)
    torch.testing.assert_close(mine[0].weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine[0].bias.grad, ref.bias.grad)


def test_torchrun_problems_are_one_line_each(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    (msg,) = distributed.problems(TrainConfig(batch_size=6))
    assert "--batch-size 6 is the global batch" in msg and "at least 8" in msg
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["train", "--out", "x", "--method", "cram", "--sam-local", "--model", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "--sam-local applies to sam, asam and var+sam" in err and "Traceback" not in err


# ---------------------------------------------------------------- under torchrun


def test_study_under_torchrun_equals_one_process(tmp_path, fmnist_dir):
    """sgd, var, sam (global-gradient perturbation), and cram+ and s2sam too: 2 processes with global batch 64
    end one epoch of 512 images with the weights of one process with batch 64; the study's sweep and report
    come from rank 0, alone (Wanda's calibration once waited there for a partner that had left: the job hung)."""
    methods = ("sgd", "var", "sam", "cram+", "s2sam")
    # lr 0.02: at lr 0.1 CrAM+'s mask at the ascent point flips on float rounding (one thread per process or
    # two threads in one give other roundings) and the runs diverge chaotically, bug or no bug
    r = torchrun(
        [
            "study",
            "--out",
            str(tmp_path / "study"),
            "--methods",
            ",".join(methods),
            "--epochs",
            "1",
            "--var-lambda",
            "1e-4",
            "--lr",
            "0.02",
            "--sparsities",
            "0.5",
            "--pruners",
            "magnitude,wanda",
            "--bnt-batches",
            "0",
            "--no-analysis",
            *TINY,
        ]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for method in methods:
        run = tmp_path / "study" / "runs" / f"{method}-s0"
        alone = one_process(tmp_path / method, method=method, epochs=1, var_lambda=1e-4, lr=0.02)
        assert_close(load_file(run / "model.safetensors"), alone)
        assert json.loads((run / "config.json").read_text())["resolved"]["processes"] == 2
        pruners = {r["pruner"] for r in json.loads((run / "prune.json").read_text())["results"]}
        assert pruners == {"magnitude", "wanda"}
    assert (tmp_path / "study" / "report.md").is_file()


def test_a_nonfinite_loss_on_one_rank_stops_both(tmp_path, fmnist_dir):
    """Only rank 1 sees a NaN loss (its gradient stays finite): both processes stop with exit 3, nothing hangs."""
    out = tmp_path / "run"
    r = torchrun(["train", "--out", str(out), "--epochs", "2", *TINY], script=PROBE, env={"PROBE_NAN_RANK": "1"})
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert "varprune: error: non-finite loss at epoch 1" in text, text[-3000:]
    assert "varprune[rank 1]: error: non-finite loss at epoch 1" in text, text[-3000:]
    assert "varprune/" not in text  # no traceback from a worker (torchrun prints its own)
    # torchrun exits 1 and lists its failed processes: rank 0 (the root cause here) exited 3
    assert text.count("exitcode  : 3") >= 1 and "exitcode  : 1" not in text, text[-3000:]
    assert not (out / "checkpoint.safetensors").exists()


def test_sigkill_then_resume_under_torchrun(tmp_path, fmnist_dir):
    """SIGKILL of the whole job after a checkpoint; --resume under torchrun finishes the run with the weights of
    an uninterrupted one-process run; rank 1 never writes into the run folder; a different world size resumes."""
    out = tmp_path / "run"
    # few steps at a gentle learning rate: float rounding differs between two processes and one (other
    # summation orders; on some CPUs even one process with one or two threads), and in this MLP a difference of
    # 1e-7 grows past 1e-4 within a few dozen steps, bug or no bug. PROBE_SLOW makes each step take 50 ms so the
    # job can be killed between two checkpoints.
    epochs, more = 3, dict(lr=0.02, limit_train=256)
    job = torchrun(
        ["train", "--out", str(out), "--epochs", str(epochs), *TINY, "--lr", "0.02", "--limit-train", "256"],
        script=PROBE,
        env={"PROBE_SLOW": "0.05"},
        popen=True,
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.safetensors").exists():
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for pid in [*descendants(job.pid), job.pid]:  # torchrun's workers are not in its process group
        os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not (out / "model.safetensors").exists(), "the job finished before it could be killed"
    shutil.copytree(out, tmp_path / "copy")

    r = torchrun(
        ["train", "--resume", str(out), "--quiet"],
        script=PROBE,
        env={"PROBE_WATCH": str(out), "PROBE_LOG": str(tmp_path / "writes")},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming" in r.stdout
    alone = one_process(tmp_path / "alone", epochs=epochs, **more)
    assert_close(load_file(out / "model.safetensors"), alone)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == epochs
    writes = {rank: json.loads((tmp_path / f"writes.{rank}").read_text()) for rank in "01"}
    assert writes["1"] == []
    assert any("model.safetensors" in w for w in writes["0"]), writes["0"]

    # the same checkpoint resumed by one process: the global batch is the same, so is the run
    train(
        TrainConfig(**json.loads((tmp_path / "copy" / "config.json").read_text())["train"]),
        tmp_path / "copy",
        resume=True,
        log=lambda *_: None,
        progress=False,
    )
    assert_close(load_file(tmp_path / "copy" / "model.safetensors"), alone)


def test_sam_local_perturbs_with_each_process_gradient(tmp_path, fmnist_dir):
    """--sam-local runs (first pass under no_sync, every process's weights still identical: checked each epoch)
    and is a different algorithm from the global-gradient default, which equals one process."""
    r = torchrun(["train", "--out", str(tmp_path / "local"), "--method", "sam", "--sam-local", "--epochs", "1", *TINY])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    alone = one_process(tmp_path / "alone", method="sam", epochs=1)
    with pytest.raises(AssertionError, match="max difference"):
        assert_close(load_file(tmp_path / "local" / "model.safetensors"), alone, rel=1e-3)


def test_bad_input_is_exit_2_on_every_process_each_with_its_own_line(tmp_path, fmnist_dir):
    """Both processes reach their own exit 2 (torchrun's SIGTERM to the slower one once the first has failed
    must not turn it into 143), and their error lines are whole lines, never run into each other."""
    for _ in range(3):  # a race: a few tries
        r = torchrun(["train", "--out", str(tmp_path / "x"), "--epochs", "1", "--rho", "0.1", *TINY])
        text = r.stdout + r.stderr
        assert text.count("exitcode  : 2") == 2 and "exitcode  : 143" not in text, text[-3000:]
        lines = [ln for ln in text.splitlines() if "error: --rho does nothing" in ln]
        assert len(lines) == 2 and all(ln.startswith(("varprune: error", "varprune[rank 1]: error")) for ln in lines)
        assert not (tmp_path / "x").exists()
