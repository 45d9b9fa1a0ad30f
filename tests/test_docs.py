"""The documentation keeps up with the code: every public name has its API entry, and the changelog names the
version being released. (The site itself is built by `make docs`, which fails on any warning.)"""

import importlib
import re
from pathlib import Path

import varprune
from varprune import optim

ROOT = Path(__file__).resolve().parents[1]


def api_entries() -> dict[str, str]:
    """``name -> module`` for every ``::: module.name`` line of docs/api.md."""
    text = (ROOT / "docs" / "api.md").read_text()
    return {m[2]: m[1] for m in re.finditer(r"^::: (varprune(?:\.\w+)*)\.(\w+)\s*$", text, re.M)}


def test_every_public_name_has_an_api_entry_where_it_is_defined():
    entries = api_entries()
    public = [n for n in varprune.__all__ if n != "__version__"] + list(optim.__all__)
    missing = sorted(set(public) - set(entries))
    assert not missing, f"docs/api.md has no entry for {missing}"
    for name in public:
        value = getattr(optim, name) if name in optim.__all__ else getattr(varprune, name)
        module = importlib.import_module(entries[name])
        assert getattr(module, name) is value, f"docs/api.md: {entries[name]}.{name} is not varprune's {name}"


def test_the_changelog_starts_with_this_version():
    first = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    assert first == f"## {varprune.__version__}", first


# reST markup that the API reference (mkdocstrings, Markdown docstrings) would show raw
REST = re.compile(r":(class|func|meth|mod|attr|data|exc|obj):`|::\s*$", re.M)


def rendered_docstrings() -> dict[str, str]:
    """``where -> docstring`` for what docs/api.md renders, read from the source with ``ast`` (no imports: the
    callbacks' modules import transformers and Lightning): a module's docstring and its listed members; a class's
    own docstring, its methods' and those of its bases defined in the same module; a function's."""
    import ast

    text = (ROOT / "docs" / "api.md").read_text()
    src = ROOT / "src"
    out: dict[str, str] = {}

    def collect(node, where):
        out[where] = ast.get_docstring(node, clean=False) or ""
        for child in getattr(node, "body", []):
            public = not getattr(child, "name", "_").startswith("_") or getattr(child, "name", "") == "__init__"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and public:
                collect(child, f"{where}.{child.name}")

    for m in re.finditer(r"^::: (varprune(?:\.\w+)*)\s*$((?:\n    .*)*)", text, re.M):
        path, options = m[1], m[2]
        parts = path.split(".")
        module_file = next(
            (f for f in (src.joinpath(*parts).with_suffix(".py"), src.joinpath(*parts, "__init__.py")) if f.is_file()),
            None,
        )
        if module_file is not None:  # a module
            tree = ast.parse(module_file.read_text())
            out[path] = ast.get_docstring(tree, clean=False) or ""
            listed = re.search(r"members: \[([^\]]*)\]", options)
            names = [n.strip() for n in listed[1].split(",")] if listed else []
        else:
            module_file = src.joinpath(*parts[:-1]).with_suffix(".py")
            tree = ast.parse(module_file.read_text())
            names = [parts[-1]]
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        todo = [name for name in names if name in defs]
        assert todo == names, f"docs/api.md: {path}: {set(names) - set(todo)} not found in {module_file}"
        while todo:
            node = defs[todo.pop()]
            collect(node, f"{path}:{node.name}")
            todo += [b.id for b in getattr(node, "bases", []) if isinstance(b, ast.Name) and b.id in defs]
    return out


def test_the_api_reference_renders_no_rest_markup():
    docs = rendered_docstrings()
    assert "varprune.integrations.hf:VarCallback" in docs and "varprune.integrations.lightning:VarCallback" in docs
    assert "varprune.numerics.regularizers.VarRegularizer:Regularizer.penalty" in docs  # a base's methods too
    raw = {where: REST.search(doc)[0] for where, doc in docs.items() if REST.search(doc)}
    assert not raw, f"reST markup in docstrings the API reference renders (use Markdown, [`X`][path]): {raw}"
