"""Progress across a long command's steps (a demo's or a study's trainings, its pruning sweep, analysis and
report), with an estimate of the time left.

Each step opens with one line: its number, what it does, the time so far and about how long the rest will take.
The estimate weighs each step by its expected cost (a training: its epochs, twice for a two-pass optimizer) and
prices a unit of cost from the steps of the same kind that did real work so far (a reused run costs nothing and
teaches nothing), or from every kind's when this kind has not run yet. The same lines go to a terminal and to a
log: a log gets exactly one line per step, a terminal also the training's own per-epoch bar in between.
(The progress inside one pruning sweep is the sweep's own.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Step:
    what: str  # in words: "training runs/demo/var"
    kind: str  # steps of one kind share a price per unit of cost: "train", "prune", "analyze", "report"
    cost: float  # expected cost in units of the kind (a training: its epochs)
    seconds: float | None = None  # measured, once done
    reused: bool = False  # done without work (a finished run, a sweep made before)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """``progress.begin(i)`` before step ``i`` (logs its line), ``progress.end(i, reused=...)`` after it."""

    def __init__(self, command: str, steps: list[Step], log=print, clock: Callable[[], float] = time.perf_counter):
        self.command, self.steps, self.log, self.clock = command, steps, log, clock
        self.t0 = clock()
        self._started: float | None = None

    def _price(self, kind: str) -> float | None:
        """Seconds per unit of cost, from the finished steps that did work: this kind's, else all kinds'."""
        for same in (True, False):
            done = [s for s in self.steps if s.seconds is not None and not s.reused and (s.kind == kind or not same)]
            cost = sum(s.cost for s in done)
            if cost > 0:
                return sum(s.seconds or 0.0 for s in done) / cost
        return None

    def left(self) -> float | None:
        """Seconds the steps not yet finished will take, or None before any step has done work."""
        total = 0.0
        for s in self.steps:
            if s.seconds is None:
                price = self._price(s.kind)
                if price is None:
                    return None
                total += price * s.cost
        return total

    def begin(self, i: int) -> None:
        self._started = self.clock()
        left = self.left()
        estimate = "estimating the time left" if left is None else f"about {duration(left)} left"
        self.log(
            f"[{self.command} {i + 1}/{len(self.steps)}] {self.steps[i].what} "
            f"({duration(self._started - self.t0)} so far, {estimate})"
        )

    def end(self, i: int, reused: bool = False) -> None:
        start = self._started if self._started is not None else self.t0
        self.steps[i].seconds, self.steps[i].reused = self.clock() - start, reused
        self._started = None

    def finish(self) -> None:
        self.log(f"[{self.command}] done in {duration(self.clock() - self.t0)}")


def training_cost(cfg) -> float:
    """A training's expected cost: its epochs, twice for an optimizer that takes two passes a step."""
    from varprune.engine.methods import METHODS

    method = METHODS.get(cfg.method)
    passes = 2 if method is not None and method.optimizer not in ("sgd", "s2sam") else 1
    return float(cfg.epochs * passes)
