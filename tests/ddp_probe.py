"""`python -m varprune` with two test instruments, for launching under torchrun (test_distributed.py).

* PROBE_WATCH=DIR, PROBE_LOG=PREFIX: every file this process creates, opens for
  writing, renames or removes under DIR is recorded (Python audit hooks: they
  see the calls, change nothing) and written to PREFIX.RANK as JSON at exit.
* PROBE_NAN_RANK=K: on rank K the classification loss *value* becomes NaN
  while its gradient stays finite, so only that process can see it (the
  all-reduced gradients, hence every process's weights, stay finite).
"""

import atexit
import json
import os
import sys

RANK = os.environ.get("RANK", "0")
WRITE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.chmod")


def _watch(folder: str, log_prefix: str) -> None:
    root = os.path.realpath(folder)
    seen: list[str] = []

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
        elif event in WRITE_EVENTS:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            if full == root or full.startswith(root + os.sep):
                seen.append(f"{event} {full}")

    def dump():
        text = json.dumps(list(seen))
        with open(f"{log_prefix}.{RANK}", "w") as f:
            f.write(text)

    sys.addaudithook(hook)
    atexit.register(dump)


def _nan_loss() -> None:
    from varprune import tasks

    original = tasks.Classification.loss

    def loss(self, output, target):
        value = original(self, output, target)
        return value + value.detach() * float("nan")

    tasks.Classification.loss = loss


def _slow(seconds: float) -> None:
    import time

    from varprune import tasks

    original = tasks.Classification.loss

    def loss(self, output, target):
        time.sleep(seconds)
        return original(self, output, target)

    tasks.Classification.loss = loss


if __name__ == "__main__":
    if os.environ.get("PROBE_WATCH"):
        _watch(os.environ["PROBE_WATCH"], os.environ["PROBE_LOG"])
    if os.environ.get("PROBE_NAN_RANK") == RANK:
        _nan_loss()
    if os.environ.get("PROBE_SLOW"):
        _slow(float(os.environ["PROBE_SLOW"]))
    from varprune.cli import main

    sys.exit(main(sys.argv[1:]))
