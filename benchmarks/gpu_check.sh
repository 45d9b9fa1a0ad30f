#!/usr/bin/env bash
# The GPU check: every speed figure the project judges on a GPU, in one bounded run.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root
#
# Parts, in this order, each under its own time limit inside one overall budget
# (a slow part is cut off and recorded as "timeout"; the rest still run):
#
#   env           varprune doctor, nvidia-smi, torch's parallel/OpenMP info
#   var_overhead  bench_var_overhead.py: VAR step / SGD step (ResNet-18, batch 256, bf16; target <= 1.02x)
#   methods       bench_methods.py: every --method's step time / SGD
#   sweep         bench_sweep.py: the 8-sparsity ResNet-18 sweep with BNT, pruning vs BNT time (synchronised)
#   throughput    bench_throughput.py: on-device loader vs a torchvision DataLoader pipeline, same model
#   sparse        bench_sparse_inference.py: CSR on CPU, 2:4 semi-structured on CUDA
#   pruners       bench_pruners.py: magnitude, Wanda, SparseGPT side by side on GPT-2 small's shape (random
#                 weights, 32 calibration windows of 512 tokens)
#   demo          `varprune demo` at its GPU size (ResNet-18, 15 epochs, SGD vs VAR), figure demo.png
#   fsdp          fsdp_check.py: `train --fsdp` (2+ processes; on the CPU with gloo when fewer than 2 GPUs) and
#                 the Hugging Face Trainer with accelerate's FSDP2 + VarCallback (GPUs only), each against
#                 one process (JUDGED: largest relative weight difference)
#   var_compiled  bench_var_overhead.py with torch.compile of the regularizer step; only when
#                 var_overhead missed its target (or GPU_CHECK_COMPILE=1; GPU_CHECK_COMPILE=0 skips it)
#
# Output: $GPU_CHECK_OUT, else $OUT (the device tool's folder), else benchmarks/results/gpu-<date>:
#   summary.md / summary.json  one row per part (status, seconds, the judged figure), rewritten after
#                              every part, so a run cut off from outside still leaves its summary
#   parts.tar.gz               parts/<part>.json (status, figures, the script's own JSON) and <part>.log
#   demo.png, demo_results.md  the demo's figure and table
# At most 6 files, one folder level: what the device tool brings back ($OUT: 8 files, 2 levels).
#
# Environment:
#   VARPRUNE_FMNIST      folder with the four Fashion-MNIST IDX files (.gz); default .data/fashion-mnist,
#                        else /usr/share/datasets/fashion-mnist (the Debian package)
#   GPU_CHECK_SMALL=1    small sizes (minutes on CPU); automatic when torch sees no CUDA device
#   GPU_CHECK_BUDGET     overall seconds (default 460 on GPU, 180 small)
#   GPU_CHECK_PARTS      comma-separated subset of the parts above (default: all)
#   GPU_CHECK_DEMO_EPOCHS  train the GPU demo for fewer epochs (default: the demo's own 15)
#
# Prep (on a machine with the Debian package dataset-fashion-mnist), because the GPU machine has
# no network and no such package: copy the data into the ignored folder .data/ so it travels:
#
#   make gpu-data          # = mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#
# then, with the device tool: carry [".data"], command
#   PYTHONPATH=src bash benchmarks/gpu_check.sh     (timeout_s 600; the script stops itself by ~8 min)
# CPU smoke test here: GPU_CHECK_SMALL=1 OMP_NUM_THREADS=1 PYTHONPATH=src bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}   # the GPU image has python3 only
T0=$(date +%s)

# ------------------------------------------------------------------ where things go
if [ -n "${VARPRUNE_FMNIST:-}" ]; then DATA=$VARPRUNE_FMNIST
elif [ -f .data/fashion-mnist/train-images-idx3-ubyte.gz ]; then DATA=.data/fashion-mnist
else DATA=/usr/share/datasets/fashion-mnist; fi
DATA=$(cd "$DATA" 2>/dev/null && pwd || echo "$DATA")
RES=${GPU_CHECK_OUT:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$RES" || { echo "gpu_check: cannot create $RES; set GPU_CHECK_OUT to a writable folder" >&2; exit 2; }
RES=$(cd "$RES" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")   # logs, per-part JSON, the demo's runs (large)
mkdir -p "$WORK/parts"
export RES WORK

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "${GPU_CHECK_SMALL:-}" = 1 ] || [ "$CUDA" != 1 ]; then SMALL=1; else SMALL=0; fi
BUDGET=${GPU_CHECK_BUDGET:-$([ $SMALL = 1 ] && echo 180 || echo 460)}
PARTS=",${GPU_CHECK_PARTS:-env,var_overhead,methods,sweep,throughput,sparse,pruners,fsdp,demo,var_compiled},"
echo "gpu_check: cuda=$CUDA small=$SMALL budget=${BUDGET}s data=$DATA out=$RES"

# every varprune reader takes Fashion-MNIST's folder from $VARPRUNE_FMNIST (data.default_data_dir)
export VARPRUNE_FMNIST="$DATA"

# ------------------------------------------------------------------ recording (JSON, summary)
read -r -d '' RECORD <<'PYEOF'
import json, os, re, sys, tarfile, time
from pathlib import Path
work, res = Path(os.environ["WORK"]), Path(os.environ["RES"])
parts = work / "parts"

def tail(path, n=40):
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []

def demo_facts(folder):
    """Epochs done, seconds per epoch, projected training time, accuracies after BNT."""
    out = {}
    for run in ("sgd", "var"):
        d = folder / run
        f = {}
        try:
            rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
        except (OSError, ValueError):
            rows = []
        try:
            cfg = json.loads((d / "config.json").read_text())
            epochs = cfg.get("train", cfg).get("epochs")
        except (OSError, ValueError):
            epochs = None
        times = [r["epoch_time_s"] for r in rows if isinstance(r.get("epoch_time_s"), (int, float))]
        f["epochs_done"], f["epochs"] = len(rows), epochs
        if times:
            f["epoch_s_median"] = sorted(times)[len(times) // 2]
            if epochs:
                f["projected_train_s"] = f["epoch_s_median"] * epochs
        try:
            pr = json.loads((d / "prune.json").read_text())
            f["dense"] = pr.get("dense_accuracy")
            f["bnt"] = {str(r.get("sparsity")): r.get("accuracy_bnt") for r in pr.get("results", [])}
        except (OSError, ValueError):
            pass
        out[run] = f
    return out

def key_figure(p):
    r = p.get("result") or {}
    if p["part"] == "sparse" and r.get("rows"):
        cuda = [x for x in r["rows"] if x.get("device") == "cuda"]
        rows = cuda or r["rows"]
        best = max(rows, key=lambda x: x.get("speedup") or 0)
        return (f"{'2:4 CUDA' if cuda else 'CSR CPU (no CUDA rows)'} best speed-up {best['speedup']:.2f}x "
                f"(sparsity {best['sparsity']}, batch {best['batch']})")
    if p["part"] == "demo" and p.get("demo"):
        bits = []
        for run, f in p["demo"].items():
            b = f.get("bnt", {})
            at = next((k for k in ("0.95", "0.9") if b.get(k) is not None), None)
            s = f"{run}: {f.get('epochs_done')}/{f.get('epochs')} ep"
            if f.get("epoch_s_median") is not None:
                s += f", {f['epoch_s_median']:.1f} s/ep"
            if at is not None:
                s += f", {100 * b[at]:.1f}% at {100 * float(at):.0f}%+BNT"
            bits.append(s)
        return "; ".join(bits)
    if p["status"] not in ("ok", "skipped") and p["part"] != "demo":
        last = [l.strip() for l in p.get("log_tail", []) if l.strip()]
        return (last[-1] if last else "no output")[:160]
    if p.get("judged"):
        return " | ".join(re.sub(r"\s+", " ", j.replace("JUDGED", "").strip()) for j in p["judged"])
    if p["part"] == "env":
        return "; ".join(l.strip() for l in p.get("log_tail", []) if l.startswith(("GPU", "torch:", "--device")))[:160]
    return ""

def record(name, status, rc, seconds, limit, log, result, demo, *cmd):
    log = Path(log)
    text = log.read_text(errors="replace") if log.exists() else ""
    p = dict(part=name, status=status, rc=int(rc), seconds=float(seconds), limit_s=int(limit),
             command=" ".join(cmd), judged=[l.strip() for l in text.splitlines() if l.startswith("JUDGED")
                                             or l.startswith("        var-compiled")],
             table=[l for l in text.splitlines() if l.startswith("|")][:40], log_tail=tail(log))
    if result and Path(result).is_file():
        try:
            p["result"] = json.loads(Path(result).read_text())
        except ValueError as e:
            p["result_error"] = str(e)
    if demo and Path(demo).is_dir():
        p["demo"] = demo_facts(Path(demo))
    p["key"] = key_figure(p)
    (parts / f"{name}.json").write_text(json.dumps(p, indent=1) + "\n")
    summary()

def summary():
    ps = [json.loads(f.read_text()) for f in sorted(parts.glob("*.json"), key=lambda f: f.stat().st_mtime)
          if not f.name.endswith(".result.json")]  # those are the scripts' own, inside their part's record
    env = {k: os.environ.get(k) for k in ("SMALL", "CUDA", "BUDGET", "DATA")}
    elapsed = time.time() - float(os.environ["T0"])
    (res / "summary.json").write_text(json.dumps(dict(env=env, elapsed_s=elapsed, parts=[
        {k: p.get(k) for k in ("part", "status", "rc", "seconds", "limit_s", "key", "judged", "table", "result",
                               "demo", "command")} for p in ps]), indent=1) + "\n")
    lines = [f"# gpu_check {time.strftime('%Y-%m-%d %H:%M')}  (small={env['SMALL']}, cuda={env['CUDA']}, "
             f"{elapsed:.0f} s of {env['BUDGET']} s)", "",
             "| part | status | s (limit) | judged / key figure |", "|---|---|---:|---|"]
    for p in ps:
        lines.append(f"| {p['part']} | {p['status']} | {p['seconds']:.0f} ({p['limit_s']}) | {p.get('key', '')} |")
    (res / "summary.md").write_text("\n".join(lines) + "\n")
    with tarfile.open(res / "parts.tar.gz.tmp", "w:gz") as tar:
        tar.add(parts, arcname="parts")
    os.replace(res / "parts.tar.gz.tmp", res / "parts.tar.gz")

if __name__ == "__main__":
    {"record": record, "summary": summary}[sys.argv[1]](*sys.argv[2:])
PYEOF
export T0 SMALL CUDA BUDGET DATA

want() { case "$PARTS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# part NAME LIMIT_SECONDS RESULT_JSON DEMO_DIR -- command...
part() {
  local name=$1 limit=$2 result=$3 demo=$4; shift 5
  want "$name" || return 0
  local left=$(( T0 + BUDGET - $(date +%s) - 5 ))
  local t=$(( limit < left ? limit : left ))
  local log="$WORK/parts/$name.log"
  if [ "$t" -lt 10 ]; then
    echo "== $name: skipped (${left}s of the budget left)"
    echo "skipped: ${left}s of the ${BUDGET}s budget left" > "$log"
    $PY -c "$RECORD" record "$name" skipped 0 0 "$limit" "$log" "$result" "$demo" "$@"
    return 0
  fi
  echo "== $name (limit ${t}s): $*"
  local s=$(date +%s)
  timeout -k 10 "$t" "$@" > "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s ))
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status=failed; fi
  grep -E '^(JUDGED|        var-compiled)' "$log" | sed 's/^/   /'
  [ $status = ok ] || { echo "   $status (rc $rc) after ${dt}s; last lines:"; tail -n 5 "$log" | sed 's/^/   | /'; }
  $PY -c "$RECORD" record "$name" "$status" "$rc" "$dt" "$t" "$log" "$result" "$demo" "$@"
}

# ------------------------------------------------------------------ the parts
P="$WORK/parts"
if [ $SMALL = 1 ]; then
  VAR_ARGS=(--model mlp --batch-size 32 --steps 3 --warmup 1)
  METHODS_ARGS=(--model mlp --batch-size 32 --rounds 1 --steps 1)
  SWEEP_ARGS=(--model resnet20 --test-size 128 --bnt-batches 1 --bnt-batch-size 64 --threshold-repeats 1)
  TP_ARGS=(--model mlp --batch-size 32 --segment 2 --rounds 2 --loader-batches 4 --workers 1 --limit-train 2000)
  SPARSE_ARGS=(--sparsities 0.9 --batches 1 --rounds 2)
  DEMO_SIZE=check
  COMPILE_ARGS=(--model mlp --batch-size 32 --steps 3 --warmup 1)
  PRUNERS_ARGS=(--model gpt2 --n-layer 2 --n-embd 32 --n-head 2 --vocab 256 --seqlen 16 --batches 2 --batch-size 2 --repeats 1)
  L_VAR=40 L_METHODS=40 L_SWEEP=40 L_TP=45 L_SPARSE=30 L_DEMO=60 L_COMPILE=100 L_PRUNERS=40 L_FSDP=120
else
  VAR_ARGS=()
  METHODS_ARGS=()
  SWEEP_ARGS=()
  TP_ARGS=(--loader-batches 40)
  SPARSE_ARGS=(--rounds 5)
  DEMO_SIZE=gpu
  COMPILE_ARGS=(--steps 30)
  # GPT-2 small's shape (random weights, nothing downloaded), the references' 128 calibration windows shortened
  PRUNERS_ARGS=(--model gpt2 --n-layer 12 --n-embd 768 --n-head 12 --vocab 50257 --seqlen 512 --batches 32 \
                --batch-size 1 --repeats 1)
  L_PRUNERS=120
  L_VAR=90 L_METHODS=60 L_SWEEP=60 L_TP=90 L_SPARSE=60 L_DEMO=240 L_COMPILE=150 L_FSDP=120
fi

part env 30 "" "" -- bash -c "$PY -m varprune doctor --data-dir '$DATA'; nvidia-smi 2>&1 | head -15; \
  $PY -c 'import torch; print(torch.__config__.parallel_info()); print(\"cpu capability\", torch.backends.cpu.get_cpu_capability())'"
part var_overhead $L_VAR "$P/var_overhead.result.json" "" -- \
  $PY benchmarks/bench_var_overhead.py "${VAR_ARGS[@]}" --json "$P/var_overhead.result.json"
part methods $L_METHODS "" "" -- $PY benchmarks/bench_methods.py "${METHODS_ARGS[@]}"
part sweep $L_SWEEP "" "" -- $PY benchmarks/bench_sweep.py "${SWEEP_ARGS[@]}"
part throughput $L_TP "$P/throughput.result.json" "" -- \
  $PY benchmarks/bench_throughput.py "${TP_ARGS[@]}" --data-dir "$DATA" --json "$P/throughput.result.json"
part sparse $L_SPARSE "$P/sparse.result.json" "" -- \
  $PY benchmarks/bench_sparse_inference.py "${SPARSE_ARGS[@]}" --out "$P/sparse.result.json"
part pruners $L_PRUNERS "$P/pruners.result.json" "" -- \
  $PY benchmarks/bench_pruners.py "${PRUNERS_ARGS[@]}" --json "$P/pruners.result.json"
part fsdp $L_FSDP "$P/fsdp.result.json" "" -- $PY benchmarks/fsdp_check.py --json "$P/fsdp.result.json"

DEMO="$WORK/demo"
if [ $SMALL = 1 ] || [ -n "${GPU_CHECK_DEMO_EPOCHS:-}" ]; then
  # small: the demo's pipeline on an MLP and 512 images; GPU_CHECK_DEMO_EPOCHS: the GPU size, fewer
  # epochs (run_demo itself, with one more entry in its size table; demo.py is left alone)
  part demo $L_DEMO "" "$DEMO" -- $PY -c "
import sys; from pathlib import Path; import varprune.engine.demo as d
small, epochs = sys.argv[1] == '1', sys.argv[2]
d.SIZES['check'] = (dict(d.SIZES['tiny'], model='mlp', limit_train=512, limit_test=256) if small
                    else dict(d.SIZES['gpu'], epochs=int(epochs)))
d.run_demo(Path(sys.argv[3]), size='check', data_dir=sys.argv[4], progress=False)" \
    "$SMALL" "${GPU_CHECK_DEMO_EPOCHS:-0}" "$DEMO" "$DATA"
else
  part demo $L_DEMO "" "$DEMO" -- $PY -m varprune demo --size $DEMO_SIZE --out "$DEMO" --data-dir "$DATA" --quiet
fi
[ -f "$DEMO/demo.png" ] && cp "$DEMO/demo.png" "$RES/demo.png"
[ -f "$DEMO/results.md" ] && cp "$DEMO/results.md" "$RES/demo_results.md"

# the compiled regularizer step: only when the plain one missed its target (or asked for)
VERDICT=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['judged']['verdict'])" \
          "$P/var_overhead.result.json" 2>/dev/null || echo none)
if [ "${GPU_CHECK_COMPILE:-}" = 1 ] || { [ "${GPU_CHECK_COMPILE:-}" != 0 ] && [ $SMALL = 0 ] && [ "$VERDICT" != PASS ]; }; then
  part var_compiled $L_COMPILE "$P/var_compiled.result.json" "" -- $PY benchmarks/bench_var_overhead.py \
    "${COMPILE_ARGS[@]}" --variants sgd,var-fast,var-compiled --json "$P/var_compiled.result.json"
elif want var_compiled; then
  echo "== var_compiled: not run (var_overhead verdict $VERDICT; GPU_CHECK_COMPILE=1 forces it)"
fi

# ------------------------------------------------------------------ summary
$PY -c "$RECORD" summary
echo
cat "$RES/summary.md"
echo
echo "gpu_check: $(( $(date +%s) - T0 ))s; results in $RES (summary.md, summary.json, parts.tar.gz, demo.png)"
rm -rf "$WORK"
