"""Tables: the task's primary metric against sparsity, in Markdown and CSV, readable at a glance.

Every function reads prune.json / report.json documents; none trains or loads a model.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """How a metric of prune.json reads: its title, direction, valid range and unit."""

    title: str
    higher_is_better: bool = True
    lo: float = 0.0
    hi: float = 1.0
    percent: bool = True  # a fraction shown in percent; else shown as is (perplexity)

    def valid(self, x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and self.lo <= x <= self.hi

    def fmt(self, x: float | None, digits: int = 2) -> str:
        if x is None:
            return "—"
        return f"{100 * x:.{digits}f}" if self.percent else f"{x:.{digits}f}"

    @property
    def unit(self) -> str:
        return " (%)" if self.percent else ""


METRICS = {
    "accuracy": Metric("Test accuracy"),
    "dice": Metric("Test mean foreground Dice"),
    "iou": Metric("Test mean foreground IoU"),
    "pixel_accuracy": Metric("Test pixel accuracy"),
    "next_token_accuracy": Metric("Test next-token accuracy"),
    "perplexity": Metric("Test perplexity", higher_is_better=False, lo=1.0, hi=math.inf, percent=False),
}


def metric_info(name: str) -> Metric:
    return METRICS.get(name, Metric(f"Test {name}"))


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


METRIC_TITLES = {name: m.title for name, m in METRICS.items()}


def metric_of(doc: dict) -> str:
    """The primary metric of a prune.json (files of 0.1 have no ``metric``: accuracy)."""
    return doc.get("metric", "accuracy")


def metric_title(metric: str) -> str:
    return METRIC_TITLES.get(metric, f"Test {metric}")


def pruner_of(row: dict) -> str:
    """The pruner of a result row (files of 0.2 and before: magnitude)."""
    return row.get("pruner", "magnitude")


def setting_key(row: dict) -> tuple[str, object]:
    """A result row's setting: ``(pruner, N:M pattern or requested sparsity)``."""
    return pruner_of(row), (row.get("pattern") or row["sparsity"])


def setting_label(key) -> str:
    return key if isinstance(key, str) else f"{100 * key:g}%"


def _order(settings) -> list:
    return sorted(s for s in settings if not isinstance(s, str)) + sorted(s for s in settings if isinstance(s, str))


def _retuned(doc: dict) -> bool:
    """Did the sweep re-tune BatchNorm (a model without BatchNorm has nothing to re-tune)?"""
    return bool(doc.get("bn_retuning", True)) and all(f"{metric_of(doc)}_bnt" in r for r in doc["results"])


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


# the widest table a documentation page, the HTML report or a terminal shows whole: wider ones were cut off at
# the page's edge (after 95% in a sweep to 99%), the rest behind a sideways scroll bar
MAX_COLUMNS = 7


def _parts(n: int, labels: int, first: int, last: int) -> list[range]:
    """The settings' columns ``0..n-1`` in the fewest near-equal parts such that no table is wider than
    MAX_COLUMNS: each repeats the ``labels`` columns, the first also has ``first`` columns before its settings
    (dense), the last ``last`` after them (time)."""
    room = max(MAX_COLUMNS - labels, 1)
    for k in range(1, max(n, 1) + 1):
        sizes = [n // k + (i < n % k) for i in range(k)]
        widths = [size + first * (i == 0) + last * (i == k - 1) for i, size in enumerate(sizes)]
        if max(widths) <= room or k == n:
            break
    starts = [sum(sizes[:i]) for i in range(k)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def _split_table(rows: list[list[str]], head: list[str], labels: int, first: int, last: int) -> str:
    """One wide table as several, one after another: the same rows, the settings' columns shared out."""
    n = len(head) - labels - first - last
    out = []
    for i, part in enumerate(parts := _parts(n, labels, first, last)):
        keep = list(range(labels))
        keep += list(range(labels, labels + first)) if i == 0 else []
        keep += [labels + first + j for j in part]
        keep += list(range(len(head) - last, len(head))) if i == len(parts) - 1 else []
        out.append("\n".join(_table([head[c] for c in keep], [[r[c] for c in keep] for r in rows])))
    return "\n\n".join(out)


def markdown_blocks(text: str) -> tuple[list[str], list[str]]:
    """``(tables, rest)``: each table of ``text`` (from sweep_table or study_table) with the text just above it
    (its title), one table per string as the HTML page takes them, and the text after the last table."""
    tables: list[str] = []
    title: list[str] = []
    for block in text.split("\n\n"):
        if block.lstrip().startswith("|"):
            tables.append("\n".join([*title, block.strip("\n")]))
            title = []
        elif block.strip():
            title.append(block.strip("\n"))
    return tables, title


def sweep_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table, one row per run (and pruner): dense metric, then per sparsity (and pattern) the metric
    after BN re-tuning / before, or the one value when nothing was re-tuned."""
    metric = metric_of(rows[0][1]) if rows else "accuracy"
    info = metric_info(metric)
    settings = _order({setting_key(r)[1] for _, doc in rows for r in doc["results"]})
    pruners = list(dict.fromkeys(pruner_of(r) for _, doc in rows for r in doc["results"]))
    several = pruners != ["magnitude"]
    retuned = [_retuned(doc) for _, doc in rows]
    head = ["run"] + (["pruner"] if several else []) + ["dense"] + [setting_label(s) for s in settings]
    lines = []
    for (label, doc), rt in zip(rows, retuned):
        by = {setting_key(r): r for r in doc["results"]}
        m = metric_of(doc)
        for pruner in pruners:
            if not any(k[0] == pruner for k in by):
                continue
            shown = f"magnitude ({doc['scope']})" if pruner == "magnitude" and doc.get("scope") else pruner
            cells = [label] + ([shown] if several else []) + [info.fmt(doc[f"dense_{m}"])]
            for s in settings:
                r = by.get((pruner, s))
                cells.append(
                    "—" if r is None else f"{info.fmt(r[f'{m}_bnt'])} / {info.fmt(r[m])}" if rt else info.fmt(r[m])
                )
            lines.append(cells)
    scopes = sorted({str(doc["scope"]) for _, doc in rows if doc.get("scope")})
    what = "one-shot pruning" if several else "one-shot magnitude pruning" + (f" ({', '.join(scopes)})" * bool(scopes))
    if all(retuned):
        note = "with BN re-tuning / without"
    elif not any(retuned):
        note = (
            "BN re-tuning does not apply (no BatchNorm)"
            if any("no BatchNorm" in doc.get("bn_retuning_note", "") for _, doc in rows)
            else "no BN re-tuning"
        )
    else:
        note = "with BN re-tuning / without where it applies; one value where the model has no BatchNorm"
    direction = "higher" if info.higher_is_better else "lower"
    labels = 2 if several else 1
    return (
        f"{info.title}{info.unit} after {what}: {note} ({direction} is better):\n\n"
        + _split_table(lines, head, labels, first=1, last=0)
        + "\n"
        + choices_table(rows)
    )


def choice_names(doc: dict) -> list[str]:
    """The --choices tasks of a prune.json (none without --choices)."""
    return list(doc.get("dense_choices", {}).get("tasks", {}))


def choices_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown, for sweeps with ``--choices``: per run (and pruner) the multiple-choice accuracy, the mean over
    tasks of ``acc / acc_norm`` (%), dense and at every setting; empty without ``--choices``."""
    rows = [(label, doc) for label, doc in rows if "dense_choices" in doc]
    if not rows:
        return ""
    settings = _order({setting_key(r)[1] for _, doc in rows for r in doc["results"]})
    pruners = list(dict.fromkeys(pruner_of(r) for _, doc in rows for r in doc["results"]))
    several = pruners != ["magnitude"]

    def cell(c) -> str:
        return "—" if c is None else f"{pct(c['mean']['acc'])} / {pct(c['mean']['acc_norm'])}"

    lines = []
    for label, doc in rows:
        by = {setting_key(r): r for r in doc["results"]}
        for pruner in pruners:
            if any(k[0] == pruner for k in by):
                got = [by.get((pruner, s), {}).get("choices") for s in settings]
                lines.append(
                    [label] + ([pruner] if several else []) + [cell(doc["dense_choices"])] + list(map(cell, got))
                )
    head = ["run"] + (["pruner"] if several else []) + ["dense"] + [setting_label(s) for s in settings]
    tasks = dict.fromkeys(t for _, doc in rows for t in choice_names(doc))
    ns = {t: doc["dense_choices"]["tasks"][t]["n"] for _, doc in rows for t in choice_names(doc)}
    what = ", ".join(f"{t} ({ns[t]} questions)" for t in tasks)
    return (
        "\nMultiple-choice accuracy (%), acc / acc_norm as lm-eval-harness scores them, the unweighted mean over "
        f"{what}:\n\n" + "\n".join(_table(head, lines)) + "\n"
    )


def sweep_csv(doc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    m = metric_of(doc)
    retuned = _retuned(doc)
    tasks = choice_names(doc)  # --choices: each task's acc and acc_norm, then their mean
    extra = [f"{t}_{k}" for t in tasks for k in ("acc", "acc_norm")] + (
        ["choices_acc", "choices_acc_norm"] * bool(tasks)
    )
    w.writerow(["pruner", "sparsity", "realised_sparsity", m] + ([f"{m}_bnt"] if retuned else []) + extra)
    for r in doc["results"]:  # an N:M row names its pattern under sparsity
        pruner, setting = setting_key(r)
        values = [r["choices"]["tasks"][t][k] for t in tasks for k in ("acc", "acc_norm")] if tasks else []
        values += [r["choices"]["mean"]["acc"], r["choices"]["mean"]["acc_norm"]] if tasks else []
        w.writerow([pruner, setting, r["realised_sparsity"], r[m]] + ([r[f"{m}_bnt"]] if retuned else []) + values)
    return buf.getvalue()


def _ci_cell(info: Metric, mean: float, interval, paired=None) -> str:
    """``mean [low, high]``, with ``*`` when the paired difference to the baseline excludes zero."""
    from varprune.report.stats import significant

    text = info.fmt(mean) + (f" [{info.fmt(interval[0])}, {info.fmt(interval[1])}]" if interval else "")
    return text + ("*" if significant(paired) else "")


def study_table(summary: dict) -> str:
    """Markdown: per method (and pruner), the mean over seeds with its 95% interval per setting, after BN
    re-tuning and before; ``*`` marks a paired difference to the baseline whose interval excludes zero. Reads
    report.json of varprune 0.2 too (mean ± std, no intervals)."""
    methods = summary["methods"]
    spec = summary["study"]
    seeds = spec["seeds"]
    m = summary.get("metric", "accuracy")
    info = metric_info(m)
    base = summary.get("baseline")
    retuned = summary.get("bn_retuning", True)
    first = next(iter(methods.values()))
    keys = list(first["sparsities"])
    pruners = list(dict.fromkeys(first["sparsities"][k].get("pruner", "magnitude") for k in keys))
    settings = [s for s in (*spec["sparsities"], *spec.get("patterns", []))]

    def key_of(pruner, s):
        return str(s) if pruner == "magnitude" else f"{pruner}:{s}"

    def cell(e, which):
        ms = e[which]
        interval = e.get("ci95_bnt" if which.endswith("_bnt") else "ci95")
        if "ci95" not in e:  # a summary of 0.2
            return f"{info.fmt(ms[0])} ± {info.fmt(ms[1])}"
        return _ci_cell(info, ms[0], interval, e.get("paired_bnt" if which.endswith("_bnt") else "paired"))

    kinds = [(f"{m}_bnt", "after BN re-tuning"), (m, "before BN re-tuning")] if retuned else [(m, "")]
    out = []
    several = pruners != ["magnitude"]
    for which, title in kinds:
        head = (
            ["method"]
            + (["pruner"] if several else [])
            + ["dense"]
            + [setting_label(s) for s in settings]
            + [f"time/epoch vs {base if base and 'time_vs_baseline' in first else 'sgd'}"]  # 0.2: vs sgd
        )
        rows = []
        for method, e in methods.items():
            time = e.get("time_vs_baseline", e.get("time_vs_sgd"))  # a summary of 0.2 has only time_vs_sgd
            ratio = "—" if time is None else f"{time:.2f}x"
            dense = (
                _ci_cell(info, e["dense"][0], e.get("dense_ci95"), e.get("dense_paired"))
                if "dense_ci95" in e
                else f"{info.fmt(e['dense'][0])} ± {info.fmt(e['dense'][1])}"
            )
            for pruner in pruners:
                cells = [method] + ([pruner] if several else []) + [dense]
                for s in settings:
                    c = e["sparsities"].get(key_of(pruner, s))
                    cells.append("—" if c is None else cell(c, which))
                rows.append(cells + [ratio])
        stat = f"mean [95% interval] over seeds {seeds}" if "dense_ci95" in first else f"mean ± std over seeds {seeds}"
        mark = f"; * the paired difference to {base} excludes zero" if base and "dense_ci95" in first else ""
        label = f"{info.title}{info.unit}, {stat}, one-shot pruning {title}".rstrip(", ") + f"{mark}:"
        if not retuned:
            label = label.replace(":", " (BN re-tuning does not apply: no BatchNorm):", 1) if not title else label
        out.append(label + "\n\n" + _split_table(rows, head, 2 if several else 1, first=1, last=1))
    text = "\n\n".join(out) + "\n" + _study_choices(summary, settings, pruners, key_of)
    if summary.get("cross_text"):
        which = "after BN re-tuning" if retuned else "as measured"
        text += (
            f"\nEach method pruned by magnitude against {base} pruned by a calibrated pruner, paired by seed "
            f"(the first minus the second, {which}; {'higher' if info.higher_is_better else 'lower'} is better):\n\n"
            + "".join(f"* {line}\n" for line in summary["cross_text"])
        )
    if summary.get("findings"):
        text += "\nDifferences whose 95% interval excludes zero:\n\n" + "".join(f"* {f}\n" for f in summary["findings"])
    elif base and "dense_ci95" in first:
        text += f"\nNo difference to {base} has a 95% interval that excludes zero.\n"
    return text


def _study_choices(summary: dict, settings: list, pruners: list[str], key_of) -> str:
    """The study's multiple-choice table (``--choices``): per method (and pruner) the mean over seeds of the mean
    ``acc`` over tasks, with its 95% interval, dense and per setting; empty without ``--choices``."""
    methods = summary["methods"]
    if not all("choices_dense" in e for e in methods.values()):
        return ""
    info = Metric("acc")
    several = pruners != ["magnitude"]

    def cell(c) -> str:
        return "—" if c is None else _ci_cell(info, c["acc"][0], c.get("ci95"))

    rows = []
    for method, e in methods.items():
        for pruner in pruners:
            got = [e["sparsities"].get(key_of(pruner, s), {}).get("choices") for s in settings]
            rows.append([method] + ([pruner] if several else []) + [cell(e["choices_dense"])] + [cell(c) for c in got])
    head = ["method"] + (["pruner"] if several else []) + ["dense"] + [setting_label(s) for s in settings]
    tasks = ", ".join(summary["study"].get("choices", [])) or "--choices"
    return (
        f"\nMultiple-choice accuracy (acc, %, the unweighted mean over {tasks}), mean [95% interval] over seeds, "
        "one-shot pruning:\n\n" + "\n".join(_table(head, rows)) + "\n"
    )


# ---------------------------------------------------------------- one HTML page
