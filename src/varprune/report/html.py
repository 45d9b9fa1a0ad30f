"""One self-contained HTML page: figures, tables, configs, machine and versions.

The page reads offline and as a single file (mail it, attach it to an issue):
figures are embedded as base64 PNG data URIs, the style sheet is inline,
there is no JavaScript and no external resource. Every piece of text is
escaped with :func:`html.escape`.

Input is plain data, easy to build from results files::

    sections = [
        {"heading": "Pruning sweep",
         "paragraphs": ["Test accuracy after one-shot global magnitude pruning."],
         "tables": [sweep_table_markdown,                      # a Markdown table string, or
                    {"header": ["run", "dense"], "rows": [["sgd", "94.5"]],
                     "title": "...", "caption": "..."}],            # title above, caption below
         "images": ["prune.png", {"path": "hist.png", "caption": "|w| per layer"}],
         "code": ["varprune train --method var --lam 1e-5"],
         "details": [{"summary": "prune.json", "json": {...}}]},
    ]
    write_html_report("report.html", "varprune report", sections,
                      configs={"sgd": cfg_sgd, "var": cfg_var})

Within a section the blocks come in the order paragraphs, tables, images,
code, details.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import json
import os
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from varprune import __version__
from varprune.storage.files import atomic_write_text

SECTION_KEYS = ("heading", "paragraphs", "tables", "images", "code", "details")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NUMERIC = re.compile(r"[\s\d.,±%x×/—+\-eE()]+")


class ReportError(ValueError):
    """A report input a user can fix: a missing figure, a malformed table or section."""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def machine_info() -> dict[str, str]:
    """Machine and library versions for a report's footer: Python, OS, CPU count, torch, CUDA device."""
    info = {
        "generated (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu count": str(os.cpu_count()),
    }
    from importlib import metadata

    for dist in ("varprune", "torch", "numpy", "matplotlib", "monai", "timm", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda"] = str(torch.version.cuda)
            info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        else:
            info["gpu"] = "none visible"
    except Exception as e:  # a broken CUDA install must not cost the report
        info["gpu"] = f"unknown ({type(e).__name__})"
    return info


def parse_markdown_table(text: str) -> dict:
    """A Markdown pipe table as ``{"header", "rows", "title", "caption"}``.

    Lines starting with ``|`` are the table (the first is the header, a
    ``|---|`` separator line is skipped); the other non-empty lines become the
    title when they come before the table (it is drawn above it) and the
    caption when they come after (drawn below). Raises :class:`ReportError`
    when there is no table or a row has the wrong number of cells.
    """
    rows: list[list[str]] = []
    title: list[str] = []
    caption: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c) and any(cells):
                continue
            rows.append(cells)
        elif s:
            (caption if rows else title).append(s)
    if not rows:
        raise ReportError("table text has no Markdown table lines (lines starting with '|')")
    return _check_table({"header": rows[0], "rows": rows[1:], "title": " ".join(title), "caption": " ".join(caption)})


def _check_table(t: Mapping) -> dict:
    if not isinstance(t, Mapping) or "rows" not in t:
        raise ReportError("a table is a Markdown string or a dict with 'header' and 'rows'")
    header = [str(c) for c in t.get("header") or []]
    rows = [[("" if c is None else str(c)) for c in r] for r in t["rows"]]
    width = len(header) if header else (len(rows[0]) if rows else 0)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ReportError(f"table row {i + 1} has {len(r)} cells but the header has {width}")
    return {"header": header, "rows": rows, "title": str(t.get("title") or ""), "caption": str(t.get("caption") or "")}


def _cell(tag: str, text: str) -> str:
    numeric = tag == "td" and bool(_NUMERIC.fullmatch(text)) and any(ch.isdigit() for ch in text)
    return f"<{tag}{' class=num' if numeric else ''}>{_e(text)}</{tag}>"


def _table_html(t) -> str:
    t = parse_markdown_table(t) if isinstance(t, str) else _check_table(t)
    # a table has one <caption>: the title (drawn above) if there is one, else the caption (drawn below);
    # a caption next to a title follows the table as a note
    out = ["<table>"]
    if t["title"]:
        out.append(f"<caption class=title>{_e(t['title'])}</caption>")
    elif t["caption"]:
        out.append(f"<caption>{_e(t['caption'])}</caption>")
    if t["header"]:
        out.append("<thead><tr>" + "".join(_cell("th", c) for c in t["header"]) + "</tr></thead>")
    out.append("<tbody>")
    out += ["<tr>" + "".join(_cell("td", c) for c in r) + "</tr>" for r in t["rows"]]
    out.append("</tbody></table>")
    if t["title"] and t["caption"]:
        out.append(f"<p class=note>{_e(t['caption'])}</p>")
    return "\n".join(out)


def _image_html(item) -> str:
    if isinstance(item, Mapping):
        path, caption = item.get("path"), item.get("caption") or ""
    else:
        path, caption = item, ""
    if path is None:
        raise ReportError("an image entry has no 'path'")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ReportError(f"figure {path} cannot be read ({e.strerror or e}): write it first or leave it out") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ReportError(f"figure {path} is not a PNG file: only PNG figures are embedded")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    alt = caption or path.name
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{_e(alt)}">{cap}</figure>'


def _details_html(item) -> str:
    if not isinstance(item, Mapping) or "summary" not in item:
        raise ReportError("a details entry is a dict with 'summary' and 'json' or 'text'")
    if "json" in item:
        body = json.dumps(item["json"], indent=2, sort_keys=True, default=str)
    else:
        body = str(item.get("text", ""))
    return f"<details><summary>{_e(item['summary'])}</summary><pre>{_e(body)}</pre></details>"


def _as_list(section: Mapping, key: str) -> list:
    value = section.get(key) or []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        value = [value]  # one paragraph/table/image/code block given without a list
    return list(value)


def _section_html(i: int, section: Mapping) -> str:
    if not isinstance(section, Mapping):
        raise ReportError(f"section {i + 1} is not a dict with a 'heading'")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ReportError(f"section {i + 1} has unknown key(s) {', '.join(unknown)}; known: {', '.join(SECTION_KEYS)}")
    if not section.get("heading"):
        raise ReportError(f"section {i + 1} has no 'heading'")
    out = [f'<section id="s{i + 1}"><h2>{_e(section["heading"])}</h2>']
    out += [f"<p>{_e(p)}</p>" for p in _as_list(section, "paragraphs")]
    out += [_table_html(t) for t in _as_list(section, "tables")]
    out += [_image_html(im) for im in _as_list(section, "images")]
    out += [f"<pre><code>{_e(c)}</code></pre>" for c in _as_list(section, "code")]
    out += [_details_html(d) for d in _as_list(section, "details")]
    out.append("</section>")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #e4e7eb; padding-bottom: .2em; }
nav ol { font-size: .95em; }
a { color: #0a58ca; text-decoration: none; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: .9em; padding-top: .4em; }
caption.title { caption-side: top; color: inherit; font-size: 1em; font-weight: 600; padding: 0 0 .4em; }
p.note { color: #555; font-size: .9em; margin-top: -.6em; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; text-align: left; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e7eb; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f6f8fa; border: 1px solid #e4e7eb; padding: .7em; overflow-x: auto; font-size: .85em; }
details { margin: .5em 0; }
summary { cursor: pointer; font-weight: 600; }
dl.machine { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; font-size: .9em; }
dl.machine dt { color: #555; }
dl.machine dd { margin: 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
"""


def render_html(
    title: str,
    sections: Sequence[Mapping],
    configs: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
) -> str:
    """The page as a string; see :func:`write_html_report`."""
    if isinstance(sections, Mapping):
        sections = [sections]
    body = [_section_html(i, s) for i, s in enumerate(sections)]
    toc = [f'<li><a href="#s{i + 1}">{_e(s["heading"])}</a></li>' for i, s in enumerate(sections)]
    env = ['<section id="environment"><h2>Configuration and environment</h2>']
    toc.append('<li><a href="#environment">Configuration and environment</a></li>')
    if configs:
        env.append("<p>Resolved configuration of each run (every default written):</p>")
        env += [_details_html({"summary": label, "json": cfg}) for label, cfg in configs.items()]
    info = machine_info() if machine is None else machine
    env.append(
        '<dl class="machine">'
        + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in info.items())
        + "</dl></section>"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="varprune {_e(__version__)}">',
            f"<title>{_e(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            "<nav><ol>" + "".join(toc) + "</ol></nav>",
            *body,
            *env,
            "</body></html>",
            "",
        ]
    )


def write_html_report(
    path: str | os.PathLike,
    title: str,
    sections: Sequence[Mapping],
    configs: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
) -> str:
    """Write one self-contained HTML page atomically; return its path.

    ``sections``: a list of dicts with ``heading`` (required) and any of
    ``paragraphs`` (strings), ``tables`` (Markdown pipe-table strings, one
    table each, e.g. from ``report.tables.markdown_blocks``, text above the
    table its title and below it its caption, or ``{"header": [...], "rows": [[...]], "title": ..., "caption":
    ...}``; the title is drawn directly above its table, the caption below),
    ``images`` (PNG paths or ``{"path", "caption"}``), ``code`` (strings
    shown verbatim) and ``details`` (``{"summary", "json"}`` or
    ``{"summary", "text"}``, collapsed). ``configs``: ``{run label:
    resolved config dict}``, shown as JSON in collapsed blocks. ``machine``:
    facts for the footer (default :func:`machine_info`).

    All text is escaped; figures are embedded as base64 data URIs; the page
    has no JavaScript and loads nothing from outside. Raises
    :class:`ReportError` for a missing or non-PNG figure, a malformed table
    or an unknown section key.
    """
    text = render_html(title, sections, configs, machine)
    atomic_write_text(path, text)
    return str(path)
