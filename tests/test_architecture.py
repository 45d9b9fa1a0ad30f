"""The house rules of src/varprune, read from the source: layers, no import circle, no long module, and a
public surface that does not change under anyone's feet.

Imports are read with ``ast`` (module level and inside functions alike), so a circle hidden in a function
body counts as much as one at the top of a file.
"""

import argparse
import ast
from pathlib import Path

import pytest

import varprune

SRC = Path(varprune.__file__).resolve().parent
MAX_LINES = 600

# Which layer may import which (shared/DESIGN.md; docs/architecture.md says why). Foundation modules
# (errors, device, the package itself for __version__) may be imported by anyone.
FOUNDATION = {"varprune", "varprune.errors", "varprune.device"}
LAYERS = ["numerics", "models", "storage", "data", "report", "tasks", "integrations", "engine", "commands", "cli"]
FORBIDDEN = {
    "numerics": set(LAYERS) - {"numerics"},  # tensors and modules in, tensors out
    "models": set(LAYERS) - {"models"},  # models know nothing of pruning, data or training
    "data": {"models", "numerics", "tasks", "engine", "commands", "cli", "report", "integrations"},
    "report": {"engine", "tasks", "commands", "cli", "data", "integrations"},  # reads results, never trains
    "storage": {"data", "tasks", "engine", "commands", "cli", "report", "integrations"},
    "tasks": {"engine", "commands", "cli", "data", "report", "integrations"},
    "integrations": {"engine", "commands", "cli", "data", "report"},
    "engine": {"commands", "cli"},
    "commands": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """Every varprune module ``path`` imports, resolved to the module that is loaded."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in mods and t != name)
    return found


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, mods) for name, path in mods.items()}


def test_no_import_circle():
    g = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own submodules is not a circle of meaning
            if len(comp) > 1 and not all(
                c.startswith(min(comp, key=len) + ".") or c == min(comp, key=len) for c in comp
            ):
                circles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_arrows_only_point_down():
    wrong = []
    for name, targets in graph().items():
        layer = layer_of(name)
        for t in targets:
            if t in FOUNDATION or layer is None:
                continue
            if layer_of(t) in FORBIDDEN.get(layer, ()):
                wrong.append(f"{name} -> {t}")
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def test_foundation_imports_no_layer():
    g = graph()
    for name in ("varprune.errors", "varprune.device"):
        assert not {t for t in g[name] if layer_of(t)}, name


def test_no_module_over_600_lines():
    long = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    assert not {k: v for k, v in long.items() if v > MAX_LINES}


def test_the_layers_are_folders():
    for layer in LAYERS[:-1]:
        if layer == "integrations" and not (SRC / layer).is_dir():
            continue
        assert (SRC / layer / "__init__.py").is_file(), layer
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "device.py", "errors.py", "optim.py"], top


# ------------------------------------------------------------------ the public surface

PUBLIC_NAMES_0_2 = [
    "HoyerSquareRegularizer",
    "L1Regularizer",
    "MagnitudePruner",
    "MaskKeeper",
    "VarRegularizer",
    "classify_parameters",
    "create_model",
    "dice_score",
    "hessian_top_eigenvalue",
    "hoyer_square_penalty",
    "keep_mask_topk",
    "l1_penalty",
    "list_models",
    "load_pruned",
    "loss_profile",
    "model_task",
    "nm_masks",
    "prunable_weights",
    "prune_magnitude",
    "prune_nm",
    "read_pruned_metadata",
    "realised_sparsity",
    "recalibrate_bn",
    "register_model",
    "save_pruned",
    "var_penalty",
    "__version__",
]

CLI_0_2 = {
    "train": "--amp --batch-size --channels-last --compile --cram-sparsities --data-dir --dataset --device "
    "--download --epochs --hoyer-alpha --image-size --init --init-exclude --l1-alpha --limit-test "
    "--limit-train --lr --method --model --model-args --momentum --no-augment --optimizer --out "
    "--overwrite --quiet --reg-in-every-pass --resume --rho --sam-local --seed --sync-bn --var-eps "
    "--var-lambda --var-r --var-strength --warmup-epochs --weight-decay",
    "prune": "--bnt-batch-size --bnt-batches --data-dir --device --exclude --force --list-weights --patterns --plot "
    "--scope --sparsities",
    "study": "--amp --batch-size --bnt-batch-size --bnt-batches --channels-last --compile --cram-sparsities "
    "--data-dir --dataset --device --download --epochs --hoyer-alpha --image-size --init --init-exclude "
    "--l1-alpha --limit-test --limit-train --lr --methods --model --model-args --momentum --no-analysis "
    "--no-augment --optimizer --out --patterns --quiet --reg-in-every-pass --rho --sam-local --scope "
    "--seeds --sparsities --sync-bn --var-eps --var-lambda --var-r --var-strength --warmup-epochs "
    "--weight-decay",
    "tune": "--amp --baseline --batch-size --bnt-batch-size --bnt-batches --channels-last --compile "
    "--cram-sparsities --data-dir --dataset --device --download --epochs --grid --hoyer-alpha --image-size "
    "--init --init-exclude --l1-alpha --limit-test --limit-train --lr --method --model --model-args "
    "--momentum --no-augment --optimizer --out --quiet --reg-in-every-pass --rho --rounds --sam-local "
    "--scope --search --seed --sparsity --sync-bn --validation-fraction --var-eps --var-lambda --var-r "
    "--var-strength --warmup-epochs --weight-decay",
    "analyze": "--bnt-batch-size --bnt-batches --data-dir --device --hessian-iters --no-sensitivity --out "
    "--sensitivity-sparsity",
    "export": "--bnt-batch-size --bnt-batches --data-dir --device --exclude --out --pattern --scope --sparsity "
    "--values",
    "evaluate": "--data-dir --device --json",
    "finetune": "--amp --batch-size --channels-last --compile --cram-sparsities --data-dir --device --epochs "
    "--hoyer-alpha --l1-alpha --limit-test --limit-train --lr --method --momentum --no-augment "
    "--optimizer --out --overwrite --pattern --quiet --reg-in-every-pass --rho --sam-local --scope "
    "--seed --sparsity --sync-bn --var-eps --var-lambda --var-r --var-strength --warmup-epochs "
    "--weight-decay",
    "report": "--analysis --html --plot",
    "doctor": "--data-dir",
    "demo": "--data-dir --out --quiet --size --task",
}


def test_every_public_name_of_0_2_is_still_there():
    assert set(PUBLIC_NAMES_0_2) <= set(varprune.__all__)
    for name in varprune.__all__:
        assert getattr(varprune, name) is not None, name
    from varprune import optim

    for name in ("SAM", "CrAM", "S2SAM", "frozen_bn_stats", "is_two_pass"):
        assert name in optim.__all__ and callable(getattr(optim, name))


def test_every_command_and_flag_of_0_2_is_still_there():
    from varprune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in CLI_0_2.items():
        assert command in sub.choices, command
        have = {s for a in sub.choices[command]._actions for s in a.option_strings}
        missing = set(flags.split()) - have
        assert not missing, f"{command}: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(n for n in modules() if "__main__" not in n))
def test_every_module_imports(name):
    import importlib

    importlib.import_module(name)
