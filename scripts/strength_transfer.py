"""Does VAR's relative strength s = lambda * psi(w_init) transfer across models where lambda does not?

Reads the tune.json of `varprune tune --rounds 1` grids over s (one folder per model, all with the same
data, epochs and sparsity), prints per model psi_init, the best s and the best lambda, and then:

* the follow-up `varprune tune --search lambda` runs that train each model at every OTHER model's best
  lambda (printed as commands until their folders exist);
* once they exist, the transfer regret: for target model B and source model A, the validation score
  lost by using A's best s on B (read from B's own s grid) and by using A's best lambda on B.

    python scripts/strength_transfer.py studies/transfer/mlp studies/transfer/resnet20 [...]
"""
import json
import shlex
import sys
from pathlib import Path


def load(folder: Path) -> dict:
    doc = json.loads((folder / "tune.json").read_text())
    if doc["search"] != "strength" or len(doc["rounds"]) != 1:
        sys.exit(f"{folder}: expected a one-round grid over strength (varprune tune --rounds 1)")
    return doc


def main(folders: list[Path]) -> None:
    docs = {f: load(f) for f in folders}
    name = {f: docs[f]["train"]["model"] for f in folders}
    scores = {f: {c["value"]: c["score"] for c in docs[f]["rounds"][0]["candidates"]} for f in folders}
    psi = {f: docs[f]["choice"]["psi_init"] for f in folders}
    print("| model | psi_init | best s | best lambda | score at best | sgd |")
    print("|---|---:|---:|---:|---:|---:|")
    for f, d in docs.items():
        c, ref = d["choice"], d.get("baseline") or {}
        sgd = f"{100 * ref['score']:.2f}" if ref.get("score") is not None else "-"
        print(f"| {name[f]} | {psi[f]:.3g} | {c['value']:g} | {c['var_lambda']:.3g} | {100 * c['score']:.2f} | {sgd} |")
    print()
    missing, rows = [], []
    for b in folders:
        for a in folders:
            if a == b:
                continue
            best_b = docs[b]["choice"]["score"]
            s_a = docs[a]["choice"]["value"]
            lam_a = docs[a]["choice"]["var_lambda"]
            s_score = scores[b].get(s_a)
            cross = b.parent / f"{b.name}-at-{a.name}-lambda"
            if not (cross / "tune.json").is_file():
                words = shlex.split(docs[b]["command"])[2:-2]   # the grid run's training flags, without --out
                words = [w for i, w in enumerate(words) if w != "--var-strength" and
                         (i == 0 or words[i - 1] != "--var-strength")]
                missing.append(" ".join(["varprune", "tune", *map(shlex.quote, words), "--sparsity",
                                         str(docs[b]["sparsity"]), "--scope", docs[b]["scope"],
                                         "--bnt-batches", str(docs[b]["bnt_batches"]),
                                         "--bnt-batch-size", str(docs[b]["bnt_batch_size"]),
                                         "--validation-fraction", str(docs[b]["validation"]["fraction"]),
                                         "--search", "lambda", "--grid", repr(lam_a),
                                         "--rounds", "1", "--baseline", "none", "--quiet", "--out", str(cross)]))
                continue
            lam_score = json.loads((cross / "tune.json").read_text())["choice"]["score"]
            rows.append((name[b], name[a], best_b, s_score, lam_score))
    if missing:
        print("run these, then this script again:")
        print("\n".join(missing))
        return
    print("| target | source | best on target | with source's s | with source's lambda |")
    print("|---|---|---:|---:|---:|")
    for b, a, best, s_score, lam_score in rows:
        s_txt = f"{100 * s_score:.2f}" if s_score is not None else "off grid"
        print(f"| {b} | {a} | {100 * best:.2f} | {s_txt} | {100 * lam_score:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main([Path(p) for p in sys.argv[1:]])
