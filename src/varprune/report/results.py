"""Results files: prune.json (with prune.csv and prune.png beside it) and a study's report.json.

Written here and read back here, checked: a missing, damaged or edited file is one :class:`RunError` line
naming the file and the fix. Nothing here trains or loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from varprune.errors import RunError
from varprune.report.figures import sweep_plot
from varprune.report.tables import metric_of, study_table, sweep_csv
from varprune.storage.files import atomic_write_text


def write_sweep(run: Path, doc: dict, label: str) -> None:
    """prune.json, prune.csv and prune.png beside a run's weights."""
    import json

    atomic_write_text(run / "prune.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(run / "prune.csv", sweep_csv(doc))
    sweep_plot([(label, doc)], run / "prune.png", title=f"{label}: one-shot magnitude pruning")


def read_prune_json(run: Path) -> dict:
    """RUN/prune.json, checked: missing, damaged or edited is a RunError naming the file and the fix."""
    path = run / "prune.json"
    try:
        doc = json.loads(path.read_text())
        m = metric_of(doc)
        label = doc.get("label", str(run))
        ok = (
            isinstance(label, str)
            and isinstance(m, str)
            and isinstance(doc[f"dense_{m}"], (int, float))
            and isinstance(doc["results"], list)
            and doc["results"]
            and all(
                isinstance(r, dict)
                and all(
                    isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for k in ("sparsity", m, f"{m}_bnt")
                )
                for r in doc["results"]
            )
        )
    except FileNotFoundError:
        raise RunError(f"{path} not found: run `varprune prune {run}` first") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise RunError(f"{path} is not a varprune prune.json (damaged or edited); rerun `varprune prune {run}`")
    return doc


def read_study_report(study: Path) -> dict:
    """STUDY/report.json and its table, checked by rendering it: a damaged or edited file is a RunError."""
    path = study / "report.json"
    try:
        summary = json.loads(path.read_text())
        spec = summary["study"]
        ok = (
            isinstance(summary["methods"], dict)
            and bool(summary["methods"])
            and all(isinstance(spec[k], list) for k in ("methods", "seeds", "sparsities"))
            and isinstance(spec["train"], dict)
            and all(k in spec["train"] for k in ("model", "dataset", "epochs"))
            and all(k in spec for k in ("scope", "bnt_batches", "bnt_batch_size"))
        )
        table = study_table(summary) if ok else ""
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise RunError(
            f"{path} is not a varprune study report (damaged or edited); run the same "
            f"`varprune study --out {study} ...` again to rewrite it"
        )
    return {"summary": summary, "table": table}
