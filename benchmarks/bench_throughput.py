"""Training throughput: varprune's on-device loader vs a torchvision DataLoader pipeline.

Both pipelines feed the same model, optimizer and training step: the
training loop's own ``loop.make_train_step`` with the Fashion-MNIST task (what
`varprune train --method var` runs: forward under autocast, cross-entropy,
backward, ``VarRegularizer.apply_gradient_()``, SGD). Measured side by side
in one process, in interleaved segments (A B C ..., then B C ... A, ...):

* ``device-loader``    varprune.data.DeviceLoader: uint8 images on the device,
                       randperm shuffling, batched random crop (pad 2), flip and
                       normalisation on the device;
* ``torchvision``      torchvision.datasets.FashionMNIST (the same IDX files,
                       decompressed into a temporary folder) with
                       RandomCrop(28, padding=2), RandomHorizontalFlip, ToTensor,
                       Normalize, through torch.utils.data.DataLoader with
                       ``--workers`` worker processes (persistent; pinned memory
                       and non-blocking copies on a GPU);
* with ``--channels-last both`` (default) the device loader runs with and
  without channels_last; ``--compile`` adds a torch.compile'd model (its
  compilation time is printed separately and not counted).

Each segment first runs a few untimed steps (as many as the torchvision
loader can hold prefetched), so that every pipeline is timed in its steady
state, then ``--segment`` timed steps. Images per second = timed images /
median segment time. The data pipelines are also timed alone (no model).

Judged figure (issue 4): images/s with the device loader / images/s with the
torchvision pipeline, same model. There is no numeric target; > 1 is faster.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from common import add_device_args, load_average, machine, setup_device, sync, write_json

from varprune.data import DEBIAN_FASHION_MNIST, DeviceLoader, default_data_dir, load_dataset
from varprune.engine.loop import make_train_step
from varprune.models import create_model
from varprune.numerics.regularizers import VarRegularizer
from varprune.tasks import task_for


def torchvision_fashion_mnist(source: Path, folder: Path, limit: int):
    """torchvision.datasets.FashionMNIST over the Debian package's files (decompressed, nothing downloaded)."""
    import torchvision
    from torchvision import transforms

    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        src = source / (stem + ".gz")
        if src.exists():
            with gzip.open(src, "rb") as fin, open(raw / stem, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copy(source / stem, raw / stem)
    info_mean, info_std = (0.2860,), (0.3530,)
    transform = transforms.Compose(
        [
            transforms.RandomCrop(28, padding=2),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(info_mean, info_std),
        ]
    )
    ds = torchvision.datasets.FashionMNIST(str(folder), train=True, transform=transform, download=False)
    if limit < len(ds):
        ds = torch.utils.data.Subset(ds, range(limit))
    return ds


class Endless:
    """Batches from a loader forever (a new epoch when one ends), moved to the device."""

    def __init__(self, make_loader, device, channels_last):
        self.make_loader, self.device, self.channels_last = make_loader, device, channels_last
        self.it = iter(self.make_loader())

    def __next__(self):
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.make_loader())
            x, y = next(self.it)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None, help="default: resnet20 on CPU, resnet18 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 on CPU, 256 on GPU")
    p.add_argument("--segment", type=int, default=None, help="timed steps per segment; default 4 CPU, 20 GPU")
    p.add_argument("--rounds", type=int, default=None, help="segments per pipeline; default 4 CPU, 5 GPU")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="torchvision DataLoader workers; default 1 on CPU (2 cores: one for the model's "
        "threads to share), 8 on GPU",
    )
    p.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto")
    p.add_argument("--channels-last", choices=("both", "on", "off"), default="both")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd model (device loader)")
    p.add_argument("--method", choices=("var", "sgd"), default="var")
    p.add_argument("--loader-batches", type=int, default=None, help="batches for the loader-alone timing")
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"folder with the four Fashion-MNIST IDX files (.gz or not); default {DEBIAN_FASHION_MNIST}",
    )
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--json", default=None, help="also write the figures as JSON to this file")
    add_device_args(p)
    args = p.parse_args(argv)
    device = setup_device(args)
    gpu = device.type == "cuda"
    model_name = args.model or ("resnet18" if gpu else "resnet20")
    batch = args.batch_size or (256 if gpu else 128)
    segment = args.segment or (20 if gpu else 4)
    rounds = args.rounds or (5 if gpu else 4)
    workers = args.workers if args.workers is not None else (8 if gpu else 1)
    amp = args.amp if args.amp != "auto" else ("bf16" if gpu else "none")
    loader_batches = args.loader_batches or (200 if gpu else 30)
    prefetch = 2 * workers if workers > 0 else 0
    warm_steps = max(1, prefetch)

    print("bench_throughput: images/s, on-device loader vs torchvision DataLoader, same model, interleaved")
    print(f"machine   {machine(device)}")
    print(f"load avg  {load_average()} (1/5/15 min, at start)")

    data_dir = args.data_dir or default_data_dir("fashion-mnist")
    data = load_dataset("fashion-mnist", data_dir)
    info = data.info
    task = task_for(info)  # cross-entropy; crop (pad 2) + flip on the device, as `varprune train` does
    train_x, train_y = data.train_x, data.train_y
    if args.limit_train:
        train_x, train_y = train_x[: args.limit_train], train_y[: args.limit_train]
    load_start = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tv_"))
    try:
        tv_set = torchvision_fashion_mnist(Path(data_dir), tmp, len(train_x))
        cl_modes = {"both": [False, True], "on": [True], "off": [False]}[args.channels_last]
        print(
            f"sizes     {model_name}, Fashion-MNIST 1x28x28 ({len(train_x)} training images), batch {batch}, "
            f"method {args.method}, amp {amp}; {rounds} segments x {segment} timed steps per pipeline "
            f"(+{warm_steps} untimed each); torchvision: {workers} workers, prefetch_factor 2, "
            f"pin_memory {gpu}"
        )

        def make_tv_loader(w=workers):
            return torch.utils.data.DataLoader(
                tv_set,
                batch_size=batch,
                shuffle=True,
                num_workers=w,
                pin_memory=gpu,
                drop_last=True,
                persistent_workers=w > 0,
                prefetch_factor=2 if w > 0 else None,
            )

        # ---------------------------------------------------------- data pipelines alone
        print(f"\nloader alone ({loader_batches} batches of {batch}, no model):")
        alone = {}
        dl = DeviceLoader(train_x, train_y, info, batch, train=True, device=device, seed=0, augment=task.augment)
        it = iter(dl)
        for _ in range(3):
            next(it)
        sync(device)
        t = time.perf_counter()
        for _ in range(loader_batches):
            try:
                x, _ = next(it)
            except StopIteration:
                it = iter(dl)
                x, _ = next(it)
        sync(device)
        alone["device-loader"] = loader_batches * batch / (time.perf_counter() - t)
        for w in sorted({0, 1, 2, workers}):
            loader = make_tv_loader(w)
            it = iter(loader)
            t0 = time.perf_counter()
            next(it)  # worker start-up and the first batch
            startup = time.perf_counter() - t0
            t = time.perf_counter()
            for _ in range(loader_batches):
                x, _y = next(it)
                x = x.to(device, non_blocking=True)
            sync(device)
            alone[f"torchvision w{w}"] = loader_batches * batch / (time.perf_counter() - t)
            print(
                f"  torchvision DataLoader, {w} workers: {alone[f'torchvision w{w}']:>9.0f} images/s "
                f"(start-up + first batch {startup:.2f} s)"
            )
            del it, loader
        print(
            f"  varprune DeviceLoader:              {alone['device-loader']:>9.0f} images/s "
            f"({alone['device-loader'] / alone[f'torchvision w{workers}']:.1f}x torchvision with {workers} workers)"
        )

        # ---------------------------------------------------------- with the model
        torch.manual_seed(0)
        base = create_model(model_name, info.channels, info.num_classes, info.size).to(device)
        state = {k: v.clone() for k, v in base.state_dict().items()}

        pipelines = {}

        def add(name, channels_last, use_tv, compiled=False):
            model = create_model(model_name, info.channels, info.num_classes, info.size).to(device)
            model.load_state_dict(state)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
            regs = [VarRegularizer(model, 1e-6)] if args.method == "var" else []
            if use_tv:
                source = Endless(make_tv_loader, device, channels_last)
            else:
                loader = DeviceLoader(
                    train_x,
                    train_y,
                    info,
                    batch,
                    train=True,
                    device=device,
                    seed=0,
                    augment=task.augment,
                    channels_last=channels_last,
                )
                source = Endless(lambda: loader, device, False)
            forward = torch.compile(model) if compiled else model
            # the training loop's own step, as `varprune train` runs it
            train_step = make_train_step(forward, model, opt, regs, task, device, amp)
            pipelines[name] = dict(model=model, step=train_step, source=source, times=[])

        for cl in cl_modes:
            add(f"device-loader{' channels_last' if cl else ''}", cl, use_tv=False)
        add("torchvision" + (" channels_last" if cl_modes == [True] else ""), cl_modes == [True], use_tv=True)
        if args.compile:
            add(
                f"device-loader compiled{' channels_last' if cl_modes == [True] else ''}",
                cl_modes == [True],
                use_tv=False,
                compiled=True,
            )

        def step(pl):
            x, y = next(pl["source"])
            pl["step"](x, y)

        compile_s = None
        syncs = None
        if args.compile:
            name = next(n for n in pipelines if "compiled" in n)
            sync(device)
            t = time.perf_counter()
            step(pipelines[name])
            sync(device)
            compile_s = time.perf_counter() - t
            print(f"\ncompile   first compiled step {compile_s:.1f} s (compilation; not counted)")
            for _ in range(2):
                step(pipelines[name])

        names = list(pipelines)
        for name in names:  # warm-up
            for _ in range(2):
                step(pipelines[name])
        sync_mode_note = ""
        if gpu:  # the hot loop must not synchronise with the host
            torch.cuda.set_sync_debug_mode("warn")
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    step(pipelines[names[0]])
            torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            sync_mode_note = f"host synchronisations in 3 device-loader steps: {len(syncs)}"
        t_start = time.perf_counter()
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                pl = pipelines[name]
                for _ in range(warm_steps):
                    step(pl)
                sync(device)
                t = time.perf_counter()
                for _ in range(segment):
                    step(pl)
                sync(device)
                pl["times"].append(time.perf_counter() - t)
        wall = time.perf_counter() - t_start

        print(f"\nwith the model ({model_name}, {args.method}), median of {rounds} segments of {segment} steps:")
        ips = {name: segment * batch / statistics.median(pl["times"]) for name, pl in pipelines.items()}
        tv_name = next(n for n in names if n.startswith("torchvision"))
        for name in names:
            ts = pipelines[name]["times"]
            print(
                f"  {name:<34}{ips[name]:>9.0f} images/s   ({1e3 * min(ts) / segment:.0f}.."
                f"{1e3 * max(ts) / segment:.0f} ms/step)   {ips[name] / ips[tv_name]:.3f}x torchvision"
            )
        if sync_mode_note:
            print(f"  {sync_mode_note}")
        load_end = load_average()
        print(f"timed section {wall:.1f} s; load avg {load_end} at end")
        same_layout = next(
            n
            for n in names
            if n.startswith("device-loader")
            and "compiled" not in n
            and (("channels_last" in n) == ("channels_last" in tv_name))
        )
        ratio = ips[same_layout] / ips[tv_name]
        best = max((n for n in names if n.startswith("device-loader")), key=ips.get)
        print(
            f"\nJUDGED  images/s device loader / torchvision DataLoader ({workers} workers), same model and "
            f"layout = {ratio:.3f}  (no numeric target; >1 = faster)  {'FASTER' if ratio > 1 else 'NOT FASTER'}"
        )
        print(f"        best varprune configuration: {best}, {ips[best] / ips[tv_name]:.3f}x torchvision")
        write_json(
            args.json,
            dict(
                bench="throughput",
                machine=machine(device),
                device=device.type,
                load_start=load_start,
                load_end=load_end,
                sizes=dict(
                    model=model_name,
                    batch=batch,
                    train_images=len(train_x),
                    method=args.method,
                    amp=amp,
                    rounds=rounds,
                    segment=segment,
                    workers=workers,
                ),
                loader_alone_images_s=alone,
                training_images_s=ips,
                host_syncs_in_3_steps=None if syncs is None else len(syncs),
                compile_s=compile_s,
                timed_s=wall,
                judged=dict(
                    name=f"images/s device loader / torchvision DataLoader ({workers} workers)",
                    value=ratio,
                    target="> 1",
                    verdict="PASS" if ratio > 1 else "FAIL",
                ),
                best=dict(name=best, ratio=ips[best] / ips[tv_name]),
            ),
        )
        for pl in pipelines.values():
            pl["source"] = None  # stop persistent workers
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
