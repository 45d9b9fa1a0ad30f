"""Choosing VAR's strength for a target sparsity without a full grid search: ``varprune tune``.

The search is successive halving over a log grid of candidate values, either
the relative strength ``s`` (``lambda = s / psi(w_init)``, ``--var-strength``)
or ``lambda`` itself:

* ``R`` rounds; round ``r`` (1..R) trains its candidates for
  ``e_r = max(1, ceil(E / 2 ** (R - r)))`` epochs, so the last round trains
  for the full ``--epochs E`` and each earlier round for half the next one's.
  Every run is a complete training of ``e_r`` epochs (warm-up and cosine
  decay over its own length), not a prefix of a longer one.
* Round 1 takes every grid value; each later round keeps the better half
  (``ceil(n / 2)``) of the previous round's candidates by score.
* By default ``R = 1 + ceil(log2(N / 2))`` for ``N`` candidates, so the
  last round compares two survivors (6 -> 3 -> 2 for the default grid).
* The choice is the last round's best candidate; ties go to the smaller value.
  A run whose loss or weights stop being finite scores below every other.

A candidate's score is the task's primary metric (accuracy, Dice) after
one-shot global magnitude pruning at ``--sparsity`` and BN re-tuning on
training images, measured on a validation split carved from the TRAINING set
(``validation_fraction`` of it, 10% by default, drawn with a fixed seed: see
``data.validation_indices``). The test split is never read, so its files may
be absent. ``--limit-train`` and ``--limit-test`` apply after the split (to
the training rest and to the validation examples).

Every candidate is an ordinary run folder, ``DIR/candidates/<value>-e<epochs>``,
scored by the pruning sweep (its ``prune.json``): an interrupted tuning
resumes where it stopped, and rounds with equal epochs share runs. A
reference run of ``--baseline`` (SGD by default) at the full epochs is scored
the same way, so the gain is visible. Outputs: ``DIR/tune.json`` (schedule,
every score, the choice, the ``varprune train`` command to run with it) and
``DIR/tune.png`` (score against candidate, one line per round, log x).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path
from typing import Any

from varprune.data import VALIDATION_SEED
from varprune.engine.checks import problems
from varprune.engine.config import FIELDS, TrainConfig, flag_of
from varprune.engine.runconfig import read_resolved
from varprune.errors import NonFiniteError, RunError, short
from varprune.report.figures import save_png
from varprune.storage.files import OutputFolder

SEARCHES = ("strength", "lambda")
DEFAULT_GRIDS = {"strength": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), "lambda": (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)}
DEFAULT_VALIDATION_FRACTION = 0.1


# ---------------------------------------------------------------- the schedule


def halvings(n: int) -> int:
    """Rounds until one candidate is left: 6 -> 3 -> 2 -> 1 is 4."""
    rounds = 1
    while n > 1:
        n = math.ceil(n / 2)
        rounds += 1
    return rounds


def default_rounds(n: int) -> int:
    """Rounds whose last one compares two survivors (one round for one or two candidates)."""
    return 1 if n <= 2 else 1 + math.ceil(math.log2(n / 2))


def schedule(n: int, epochs: int, rounds: int) -> list[tuple[int, int]]:
    """(candidates, epochs) per round: the top half goes on, the epochs double, the last round gets ``epochs``."""
    plan, left = [], n
    for r in range(1, rounds + 1):
        plan.append((left, max(1, math.ceil(epochs / 2 ** (rounds - r)))))
        left = math.ceil(left / 2)
    return plan


def candidate_config(base: TrainConfig, search: str, value: float, epochs: int) -> TrainConfig:
    if search == "strength":
        return dataclasses.replace(base, var_strength=float(value), epochs=epochs)
    return dataclasses.replace(base, var_lambda=float(value), var_strength=None, epochs=epochs)


def candidate_name(search: str, value: float, epochs: int) -> str:
    return f"{'s' if search == 'strength' else 'lambda'}{float(value)!r}-e{epochs}"  # exact: no two share a folder


# ---------------------------------------------------------------- checks


def tune_problems(
    base: TrainConfig, sparsity: float | None, search: str, grid, rounds: int | None, baseline: str | None
) -> list[str]:
    """Every problem with a tuning request, as one-line messages (nothing is read or written)."""
    from varprune.engine.methods import METHODS

    found = problems(base)
    if "var" not in str(base.method).split("+"):
        with_var = ", ".join(m for m in METHODS if "var" in m.split("+"))
        found.append(f"tune searches VAR's strength: --method must use VAR ({with_var}), got {short(base.method)}")
    if sparsity is None:
        found.append("tune needs --sparsity, the sparsity the choice is made for (e.g. --sparsity 0.95)")
    elif not 0 < sparsity < 1:
        found.append(f"--sparsity must be in (0, 1), got {short(sparsity)}")
    if search not in SEARCHES:
        found.append(f"--search must be strength or lambda, got {short(search)}")
    if grid is not None:
        if not grid or any(not (math.isfinite(v) and v > 0) for v in grid):
            found.append(f"--grid needs positive, finite values (a log grid such as 0.1,0.3,1), got {short(grid)}")
        elif len(set(grid)) != len(grid):
            found.append(f"--grid values must be unique, got {short(grid)}")
        elif search == "lambda" and max(grid) > FIELDS["var_lambda"].metadata["hi"]:
            found.append(f"--grid: lambda above {FIELDS['var_lambda'].metadata['hi']:g} is out of range")
        elif search == "strength" and max(grid) >= FIELDS["var_strength"].metadata["hi"]:
            found.append(f"--grid: strengths must be below {FIELDS['var_strength'].metadata['hi']:g}")
    n = len(grid) if grid else len(DEFAULT_GRIDS.get(search, (1,)))
    if rounds is not None and not 1 <= rounds <= halvings(n):
        found.append(
            f"--rounds must be in [1, {halvings(n)}] for {n} candidates (each round halves them), got {rounds}"
        )
    if baseline is not None and baseline not in METHODS:
        found.append(f"--baseline {short(baseline)} is not a method (choose from {', '.join(METHODS)}, or none)")
    return found  # --validation-fraction is checked by problems(): it is a TrainConfig field


# ---------------------------------------------------------------- the command to run afterwards


def train_command(cfg: TrainConfig, out: str | Path) -> str:
    """A ``varprune train`` command line that trains ``cfg`` (every field that differs from its default)."""
    default = TrainConfig(optimizer=cfg.optimizer)
    words = ["varprune", "train"]
    for name, f in FIELDS.items():
        value, usual = getattr(cfg, name), getattr(default, name)
        # the optimizer itself is always said when it is not the default: the defaults compared against are its own
        if not f.metadata["flag"] or value is None or (value == usual and not (name == "optimizer" and value != "sgd")):
            continue
        flag = flag_of(name)
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict):
            for k, v in value.items():
                words += [flag, f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        elif isinstance(value, list):
            words += [flag, ",".join(f"{v!r}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [flag, repr(value) if isinstance(value, float) else str(value)]
    words += ["--out", str(out)]
    return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------- the search


def _score(run: Path, doc: dict) -> dict:
    from varprune.report.tables import metric_of

    m = metric_of(doc)
    row = doc["results"][0]
    return {
        "score": row.get(f"{m}_bnt", row[m]),  # after re-tuning where the model has BatchNorm
        "score_no_bnt": row[m],
        "dense": doc[f"dense_{m}"],
        "realised_sparsity": row["realised_sparsity"],
    }


def _train_and_score(
    cfgs: dict[str, TrainConfig], folder: Path, sparsity, scope, bnt_batches, bnt_batch_size, log, progress
) -> dict[str, dict]:
    """Train (or reuse, or resume) each named run, then score the finished ones by the sweep at ``sparsity``."""
    from varprune.engine.sweep import prune_runs
    from varprune.engine.trained import ensure_run

    entries: dict[str, dict[str, Any]] = {}
    finished: list[str] = []
    for name, cfg in cfgs.items():
        run = folder / name
        entries[name] = {"run": str(run)}
        try:
            ensure_run(cfg, run, log=log, progress=progress)
            finished.append(name)
        except NonFiniteError as e:
            log(f"{name}: {e}")
            entries[name].update(score=None, diverged=str(e))
    if finished:
        from varprune.engine.sweep import SweepSpec

        spec = SweepSpec(sparsities=(sparsity,), scope=scope, bnt_batches=bnt_batches, bnt_batch_size=bnt_batch_size)
        swept = prune_runs(
            [folder / n for n in finished], spec, device=next(iter(cfgs.values())).device, log=log, reuse=True
        )
        for name, (_, doc) in zip(finished, swept):
            entries[name].update(_score(folder / name, doc))
    for name in cfgs:
        resolved = read_resolved(folder / name)
        entries[name].update({k: resolved.get(k) for k in ("var_lambda", "var_strength", "psi_init")})
    return entries


def _task(cfg: TrainConfig):
    from varprune.data import dataset_info
    from varprune.tasks import TASKS

    return TASKS[dataset_info(cfg.dataset).task]


def _rank(values: list[float], scores: dict[float, float | None], higher_is_better: bool = True) -> list[float]:
    """Best first in the metric's direction; ties to the smaller value; diverged runs last."""
    sign = -1.0 if higher_is_better else 1.0
    return sorted(values, key=lambda v: (scores[v] is None, sign * (scores[v] or 0.0), v))


def run_tune(
    out: Path,
    base: TrainConfig,
    sparsity: float,
    search: str = "strength",
    grid=None,
    rounds: int | None = None,
    baseline: str | None = "sgd",
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    scope: str | None = None,
    bnt_batches: int = 20,
    bnt_batch_size: int = 500,
    log=print,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Successive halving over ``grid``; writes ``out/tune.json`` and ``out/tune.png``; returns tune.json's document."""
    out = Path(out)
    base = dataclasses.replace(base, validation_fraction=validation_fraction)
    found = tune_problems(base, sparsity, search, grid, rounds, baseline)
    from varprune.engine.loop import data_problems

    found += [p for p in data_problems(base) if p not in found]
    folder = OutputFolder(out, "tune", overwrite=overwrite, legacy=("tune.json", ("search", "rounds", "choice")))
    try:  # a tuning never replaces a file it did not write
        folder.check(("tune.json", "tune.png"))
    except RunError as e:
        found.append(str(e))
    if found:  # every problem at once, before any work
        raise RunError("; ".join(found))
    if scope is None:  # magnitude's default scope for the model's task (engine.sweep)
        from varprune.data import dataset_info
        from varprune.engine.sweep import default_scope

        scope = default_scope(dataset_info(base.dataset).task)
    values = sorted(float(v) for v in (grid or DEFAULT_GRIDS[search]))
    rounds = rounds or default_rounds(len(values))
    plan = schedule(len(values), base.epochs, rounds)
    candidates = out / "candidates"
    log(
        f"tuning VAR {search} for {100 * sparsity:g}% sparsity: "
        + " -> ".join(f"{n} candidate{'s' * (n > 1)} x {e} epoch{'s' * (e > 1)}" for n, e in plan)
    )

    doc = {
        "search": search,
        "method": base.method,
        "sparsity": sparsity,
        "scope": scope,
        "bnt_batches": bnt_batches,
        "bnt_batch_size": bnt_batch_size,
        "grid": values,
        "epochs": base.epochs,
        "schedule": [{"round": r, "candidates": n, "epochs": e} for r, (n, e) in enumerate(plan, 1)],
        "train": base.to_dict(),
        "metric": _task(base).primary,
        "rounds": [],
    }
    alive = values
    for r, (_, epochs) in enumerate(plan, 1):
        log(f"round {r}/{rounds}: {len(alive)} candidate(s), {epochs} epoch(s) each")
        names = {v: candidate_name(search, v, epochs) for v in alive}
        entries = _train_and_score(
            {names[v]: candidate_config(base, search, v, epochs) for v in alive},
            candidates,
            sparsity,
            scope,
            bnt_batches,
            bnt_batch_size,
            log,
            progress,
        )
        scores = {v: entries[names[v]]["score"] for v in alive}
        ranked = _rank(alive, scores, _task(base).higher_is_better)
        kept = ranked[: math.ceil(len(alive) / 2)] if r < rounds else ranked[:1]
        doc["rounds"].append(
            {
                "round": r,
                "epochs": epochs,
                "candidates": [{"value": v, "name": names[v], **entries[names[v]]} for v in alive],
                "kept": kept,
            }
        )
        log(_round_table(doc["rounds"][-1], search, doc["metric"]))
        alive = kept

    best = alive[0]
    last = next(c for c in doc["rounds"][-1]["candidates"] if c["value"] == best)
    if last["score"] is None:
        raise NonFiniteError(
            f"every candidate of the last round diverged (non-finite loss); lower --lr or try "
            f"smaller --grid values; the runs are in {candidates}"
        )
    final_cfg = dataclasses.replace(candidate_config(base, search, best, base.epochs), validation_fraction=None)
    if baseline is not None:
        # VAR at its default strength if the baseline method has VAR, not at the candidates' values
        ref_cfg = dataclasses.replace(base, method=baseline, var_lambda=None, var_strength=None)
        name = f"{baseline}-e{base.epochs}"
        entry = _train_and_score(
            {name: ref_cfg}, out / "baseline", sparsity, scope, bnt_batches, bnt_batch_size, log, progress
        )[name]
        doc["baseline"] = {"method": baseline, "epochs": base.epochs, **entry}
    else:
        doc["baseline"] = None
    resolved = read_resolved(Path(last["run"]))
    doc["validation"] = {
        "fraction": validation_fraction,
        "seed": VALIDATION_SEED,
        "train_examples": resolved.get("train_examples"),
        "validation_examples": resolved.get("test_examples"),
    }
    doc["metric"] = resolved.get("metric", "accuracy")
    doc["choice"] = {
        "value": best,
        "search": search,
        "score": last["score"],
        "var_lambda": last["var_lambda"],
        "var_strength": last["var_strength"],
        "psi_init": last["psi_init"],
        "run": last["run"],
        "at_edge": len(values) > 1 and best in (values[0], values[-1]),
    }
    doc["command"] = train_command(final_cfg, out / "final")
    folder.write_text("tune.json", json.dumps(doc, indent=2) + "\n")
    tune_plot(doc, out / "tune.png")
    folder.record("tune.png")
    m = doc["metric"]
    ref = doc["baseline"]
    lam = f" (lambda {last['var_lambda']:.3g})" if search == "strength" else ""
    from varprune.report.tables import metric_info

    fmt = metric_info(m).fmt
    log(
        f"choice: {search} {best:g}{lam}: validation {m} {fmt(last['score'])} "
        f"at {100 * sparsity:g}% sparsity + BNT"
        + (f"; {ref['method']}: {fmt(ref['score'])}" if ref and ref.get("score") is not None else "")
    )
    if doc["choice"]["at_edge"]:
        log(f"note: {best:g} is at the edge of the grid; the best value may lie beyond it: extend --grid")
    log(f"wrote {out / 'tune.json'}, {out / 'tune.png'}")
    log("train it on the whole training set (and measure on the test set) with:")
    log("  " + doc["command"])
    return doc


def _round_table(entry: dict, search: str, metric: str = "accuracy") -> str:
    from varprune.report.tables import metric_info

    fmt = metric_info(metric).fmt
    lines = [f"  {search:>9}  score (BNT)  no BNT   dense"]
    for c in entry["candidates"]:
        if c["score"] is None:
            lines.append(f"  {c['value']:>9g}  diverged")
            continue
        mark = "  kept" if c["value"] in entry["kept"] else ""
        lines.append(
            f"  {c['value']:>9g}  {fmt(c['score']):>11}  {fmt(c['score_no_bnt']):>7}  {fmt(c['dense']):>7}{mark}"
        )
    return "\n".join(lines)


def tune_plot(doc: dict, path: Path) -> None:
    """Validation score against candidate value (log x), one line per round; the baseline dashed; the choice starred."""
    from varprune.report.figures import _figure, _value
    from varprune.report.tables import metric_info

    m = doc["metric"]
    info = metric_info(m)
    _, fig, ax = _figure()
    for entry in doc["rounds"]:
        pts = sorted((c["value"], _value(m, c["score"])) for c in entry["candidates"] if c["score"] is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"round {entry['round']}: {entry['epochs']} epoch(s)")
    ref = doc.get("baseline")
    if ref and ref.get("score") is not None:
        ax.axhline(_value(m, ref["score"]), color="gray", ls="--", label=f"{ref['method']} ({ref['epochs']} epochs)")
    choice = doc["choice"]
    ax.plot([choice["value"]], [_value(m, choice["score"])], "*", color="black", ms=14, label="choice")
    ax.set_xscale("log")
    ax.set_xlabel("VAR strength s (lambda = s / psi(w_init))" if doc["search"] == "strength" else "VAR lambda")
    ax.set_ylabel(
        info.title.replace("Test", "validation") + info.unit + ("" if info.higher_is_better else " (lower is better)")
    )
    ax.set_title(f"{doc['method']}: {100 * doc['sparsity']:g}% sparsity + BN re-tuning, validation split")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
