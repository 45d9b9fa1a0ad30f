"""A study's summary (report.json): per method, pruner and setting, the mean over seeds with its 95% interval,
and the paired comparison with the baseline method, seed by seed; and the findings those numbers support.

Layout of report.json (every field of varprune 0.2 kept): ``study`` (the study's configuration), ``metric``,
``higher_is_better``, ``bn_retuning``, ``baseline``, and ``methods[name]``:

* ``dense`` ``[mean, std]``, ``dense_per_seed``, ``dense_ci95`` ``[low, high]`` and, for every method but
  the baseline, ``dense_paired`` ``{"baseline", "diff", "ci95", "p_value", "n"}``;
* ``epoch_time_s``, ``time_vs_baseline`` (its ratio to the baseline's) and ``time_vs_sgd`` (to the method
  named sgd, None without one);
* ``sparsities[key]`` for every setting, ``key`` the sparsity (``"0.9"``) or pattern (``"2:4"``) for magnitude
  pruning and ``"wanda:0.9"`` for another pruner: ``pruner``, ``setting``, ``<metric>`` and ``<metric>_bnt``
  ``[mean, std]``, ``per_seed`` and ``per_seed_bnt``, ``ci95`` and ``ci95_bnt``, and against the baseline
  ``paired`` and ``paired_bnt``.

With ``--choices`` (language models): ``choices_dense`` per method and ``choices`` per setting, each
``{"acc": [mean, std], "acc_norm": [mean, std], "per_seed": [acc...], "ci95": [low, high]}`` of the mean over
tasks of the multiple-choice accuracy, and ``study.choices`` the tasks' names.

Values are the metric's own (fractions for accuracy and Dice, perplexity as it is); a difference is "better"
in the metric's direction. ``findings`` states only the differences whose interval excludes zero, and the
comparison the calibrated pruners raise: each method with magnitude pruning against the baseline with Wanda or
SparseGPT, paired by seed.
"""

from __future__ import annotations

import statistics

from varprune.report.stats import mean_interval, paired, significant, why_undefined
from varprune.report.tables import metric_info, metric_of, setting_key, setting_label


def summary_key(pruner: str, setting) -> str:
    """The key of a setting in ``methods[m]["sparsities"]`` (magnitude keeps the keys of varprune 0.2)."""
    return str(setting) if pruner == "magnitude" else f"{pruner}:{setting}"


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _ratio(times: dict[str, float], meth: str, to: str) -> float | None:
    return times[meth] / times[to] if meth in times and times.get(to) else None


def summarize(spec: dict, docs: dict, times: dict[str, float], baseline: str | None = None) -> dict:
    """``docs[(method, seed)]``: each run's prune.json; ``times[method]``: its mean training time per epoch (a
    method missing from ``times`` gets None)."""
    methods, seeds = list(spec["methods"]), list(spec["seeds"])
    baseline = baseline or methods[0]
    first = next(iter(docs.values()))
    m = metric_of(first)
    retune = all(d.get("bn_retuning", True) for d in docs.values())
    summary: dict = {
        "study": {**spec, "baseline": baseline},
        "metric": m,
        "higher_is_better": metric_info(m).higher_is_better,
        "bn_retuning": retune,
        "baseline": baseline,
        "methods": {},
    }
    base_docs = [docs[(baseline, s)] for s in seeds]
    for meth in methods:
        per_seed = [docs[(meth, s)] for s in seeds]
        dense = [d[f"dense_{m}"] for d in per_seed]
        entry: dict = {
            "dense": _mean_std(dense),
            "dense_per_seed": dense,
            "dense_ci95": mean_interval(dense)[1],
            "epoch_time_s": times.get(meth),
            "time_vs_baseline": _ratio(times, meth, baseline),
            "time_vs_sgd": _ratio(times, meth, "sgd"),
            "sparsities": {},
        }
        if meth != baseline:
            entry["dense_paired"] = paired(dense, [d[f"dense_{m}"] for d in base_docs], baseline)
        if all("dense_choices" in d for d in per_seed):
            entry["choices_dense"] = _choices([d["dense_choices"] for d in per_seed])
        for i, row in enumerate(first["results"]):
            pruner, setting = setting_key(row)
            values = [d["results"][i][m] for d in per_seed]
            cell: dict = {
                "pruner": pruner,
                "setting": setting,
                m: _mean_std(values),
                "per_seed": values,
                "ci95": mean_interval(values)[1],
            }
            if meth != baseline:
                cell["paired"] = paired(values, [d["results"][i][m] for d in base_docs], baseline)
            if retune:
                after = [d["results"][i][f"{m}_bnt"] for d in per_seed]
                cell.update({f"{m}_bnt": _mean_std(after), "per_seed_bnt": after, "ci95_bnt": mean_interval(after)[1]})
                if meth != baseline:
                    cell["paired_bnt"] = paired(after, [d["results"][i][f"{m}_bnt"] for d in base_docs], baseline)
            if all("choices" in d["results"][i] for d in per_seed):
                cell["choices"] = _choices([d["results"][i]["choices"] for d in per_seed])
            entry["sparsities"][summary_key(pruner, setting)] = cell
        summary["methods"][meth] = entry
    summary["cross"] = _cross(summary, docs, seeds, baseline)
    summary["cross_text"] = cross_text(summary)
    summary["findings"] = findings(summary)
    return summary


def _choices(per_seed: list[dict]) -> dict:
    """The seeds' multiple-choice results (each the mean over tasks) summarised: mean and std of acc and
    acc_norm, acc per seed and its 95% interval."""
    acc = [c["mean"]["acc"] for c in per_seed]
    return {
        "acc": _mean_std(acc),
        "acc_norm": _mean_std([c["mean"]["acc_norm"] for c in per_seed]),
        "per_seed": acc,
        "ci95": mean_interval(acc)[1],
    }


def _cross(summary: dict, docs: dict, seeds: list, baseline: str) -> list[dict]:
    """Each method pruned by magnitude against the baseline pruned by a calibrated pruner, paired by seed."""
    m = summary["metric"]
    key = f"{m}_bnt" if summary["bn_retuning"] else m
    first = next(iter(docs.values()))
    index = {setting_key(r): i for i, r in enumerate(first["results"])}
    out = []
    for meth in summary["methods"]:
        if meth == baseline:
            continue
        for (pruner, setting), i in index.items():
            if pruner == "magnitude" or ("magnitude", setting) not in index:
                continue
            ours = [docs[(meth, s)]["results"][index[("magnitude", setting)]][key] for s in seeds]
            theirs = [docs[(baseline, s)]["results"][i][key] for s in seeds]
            out.append(
                {
                    "method": meth,
                    "pruner": "magnitude",
                    "against": baseline,
                    "against_pruner": pruner,
                    "setting": setting,
                    **paired(ours, theirs, f"{baseline}+{pruner}"),
                }
            )
    return out


def _better(diff: float, higher: bool) -> bool:
    return diff > 0 if higher else diff < 0


def _say(diff: float, info, interval, p, n: int) -> str:
    if info.percent:
        fmt = lambda v: f"{100 * v:+.1f}"  # noqa: E731
        unit = " points"
    else:
        fmt = lambda v: f"{v:+.2f}"  # noqa: E731
        unit = ""
    p_text = "p < 0.001" if p is not None and p < 0.001 else f"p = {p:.3f}" if p is not None else "p undefined"
    return f"{fmt(diff)}{unit} [{fmt(interval[0])}, {fmt(interval[1])}], {p_text}, {n} seeds"


def cross_text(summary: dict) -> list[str]:
    """Every cross comparison in words, significant or not: the question the calibrated pruners raise."""
    info = metric_info(summary["metric"])
    out = []
    for c in summary.get("cross", []):
        if c["ci95"] is None or c["p_value"] is None:
            said = f"{_fmt_diff(c['diff'], info)} ({why_undefined(c)})"
        else:
            said = _say(c["diff"], info, c["ci95"], c["p_value"], c["n"])
            said += "" if significant(c) else " (the interval includes zero)"
        out.append(
            f"{c['method']} + magnitude vs {c['against']} + {c['against_pruner']} at {setting_label(c['setting'])}: "
            f"{said}"
        )
    return out


def _fmt_diff(diff: float, info) -> str:
    return f"{100 * diff:+.1f} points" if info.percent else f"{diff:+.2f}"


def findings(summary: dict) -> list[str]:
    """One sentence per difference whose 95% interval excludes zero (after BN re-tuning where it applies)."""
    m, base = summary["metric"], summary["baseline"]
    info = metric_info(m)
    which = "paired_bnt" if summary["bn_retuning"] else "paired"
    out = []
    for meth, entry in summary["methods"].items():
        if meth == base:
            continue
        d = entry.get("dense_paired")
        if significant(d):
            word = "better" if _better(d["diff"], info.higher_is_better) else "worse"
            out.append(f"{meth} vs {base}, dense: {word}, {_say(d['diff'], info, d['ci95'], d['p_value'], d['n'])}")
        for cell in entry["sparsities"].values():
            d = cell.get(which)
            if significant(d):
                word = "better" if _better(d["diff"], info.higher_is_better) else "worse"
                pruner = "" if cell["pruner"] == "magnitude" else f" ({cell['pruner']})"
                where = setting_label(cell["setting"]) + pruner
                out.append(
                    f"{meth} vs {base} at {where}: {word}, {_say(d['diff'], info, d['ci95'], d['p_value'], d['n'])}"
                )
    for c in summary.get("cross", []):
        if significant(c):
            word = "better" if _better(c["diff"], info.higher_is_better) else "worse"
            said = _say(c["diff"], info, c["ci95"], c["p_value"], c["n"])
            out.append(
                f"{c['method']} + magnitude vs {c['against']} + {c['against_pruner']} at "
                f"{setting_label(c['setting'])}: {word}, {said}"
            )
    return out
