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
