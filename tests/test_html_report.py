"""The HTML report: self-contained, escaped, and rendered by a real browser (headless Chromium)."""

import base64
import html.parser
import io
import shutil
import subprocess

import pytest
from PIL import Image

from varprune.report.html import ReportError, parse_markdown_table, render_html, write_html_report

MAGENTA = (255, 0, 255)
SWEEP = """| run | dense | 90% | 95% |
|---|---:|---:|---:|
| sgd | 94.55 | 94.02 / 35.98 | 57.29 / 20.10 |
| var <1e-5> | 94.70 | 94.28 / 60.99 | 93.26 / 41.00 |

Test accuracy (%) after one-shot magnitude pruning: with BN re-tuning / without.
"""


def _png(path, size=(320, 160), colour=MAGENTA):
    im = Image.new("RGB", size, "white")
    im.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    im.save(path, format="PNG")
    return path


def _sections(tmp_path):
    return [
        {
            "heading": "Pruning sweep <b>bold?</b>",
            "paragraphs": ["One-shot global magnitude pruning & BN re-tuning; <script>alert(1)</script>"],
            "tables": [
                SWEEP,
                {
                    "header": ["layer", "drop"],
                    "rows": [["conv1", 0.012], ["fc", None]],
                    "caption": "per-layer sensitivity",
                },
            ],
            "images": [
                _png(tmp_path / "a.png"),
                {"path": _png(tmp_path / "b.png", (200, 200), (0, 200, 0)), "caption": 'green "figure"'},
            ],
        },
        {
            "heading": "Commands",
            "code": ["varprune train --method var --lam 1e-5 > out.txt"],
            "details": [{"summary": "prune.json", "json": {"dense_accuracy": 0.9455, "x": "</pre>"}}],
        },
    ]


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "data", "poster"):
                self.refs.append(v)

    def handle_data(self, data):
        self.text.append(data)


def test_page_is_self_contained_escaped_and_every_image_decodes(tmp_path):
    out = write_html_report(
        tmp_path / "report.html",
        "varprune <report>",
        _sections(tmp_path),
        configs={"var": {"lam": 1e-5, "method": "var"}},
        machine={"python": "3.11"},
    )
    page = (tmp_path / "report.html").read_text()
    assert out == str(tmp_path / "report.html")
    p = _Collect()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page and "&lt;report&gt;" in page
    text = "".join(p.text)
    assert "varprune train --method var --lam 1e-5 > out.txt" in text  # escaped in HTML, intact as text
    assert '"x": "</pre>"' in text and '"lam": 1e-05' in text
    images = [r for r in p.refs if r.startswith("data:")]
    assert all(r.startswith("#") or r.startswith("data:image/png;base64,") for r in p.refs), p.refs
    assert len(images) == 2 and p.tags.count("img") == 2
    for uri, want in zip(images, (MAGENTA, (0, 200, 0))):
        im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
        im.load()
        assert im.getpixel((im.width // 2, im.height // 2)) == want
    assert p.tags.count("table") == 2 and p.tags.count("details") == 2  # prune.json + one config
    assert "var &lt;1e-5&gt;" in page and "class=num>94.28 / 60.99<" in page


def test_markdown_table_parsing():
    t = parse_markdown_table(SWEEP)
    assert t["header"] == ["run", "dense", "90%", "95%"]
    assert t["rows"][1] == ["var <1e-5>", "94.70", "94.28 / 60.99", "93.26 / 41.00"]
    assert t["caption"].startswith("Test accuracy (%)")
    with pytest.raises(ReportError, match="row 2 has 2 cells"):
        parse_markdown_table("| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |\n| 1 | 2 |\n")
    with pytest.raises(ReportError, match="no Markdown table"):
        parse_markdown_table("just words")


def test_user_errors_are_typed(tmp_path):
    with pytest.raises(ReportError, match="missing.png cannot be read"):
        render_html("t", [{"heading": "h", "images": [tmp_path / "missing.png"]}])
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(ReportError, match="not a PNG"):
        render_html("t", [{"heading": "h", "images": [tmp_path / "x.png"]}])
    with pytest.raises(ReportError, match="unknown key"):
        render_html("t", [{"heading": "h", "figures": []}])
    with pytest.raises(ReportError, match="no 'heading'"):
        render_html("t", [{"paragraphs": ["x"]}])
    assert not list(tmp_path.glob("*.html"))


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def _run_chromium(exe, tmp_path, *args):
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_rendered_in_headless_chromium(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium): browser rendering not checked")
    page = tmp_path / "report.html"
    write_html_report(page, "varprune report", _sections(tmp_path), configs={"var": {"lam": 1e-5}})
    shot = tmp_path / "screenshot.png"
    r = _run_chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    for line in r.stderr.splitlines():  # no resource failed to load, no console error
        assert "net::ERR" not in line and "Failed to load resource" not in line and ":CONSOLE" not in line, line
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1200, 2000)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not blank
        # the browser decoded the embedded figures: their solid colours are on screen
        colours = {c for _, c in im.getcolors(maxcolors=1 << 20)}
        assert MAGENTA in colours and (0, 200, 0) in colours
    dom = _run_chromium(exe, tmp_path, "--dump-dom", page.as_uri()).stdout
    p = _Collect()
    p.feed(dom)
    assert p.tags.count("img") == 2 and p.tags.count("table") == 2
    assert "varprune report" in "".join(p.text)


# ---------------------------------------------------------------- wide tables: split, captioned above


SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]  # a sweep to 99%: was cut off after 95%


def _prune_doc(seed: int, shift: float) -> dict:
    acc = lambda s, k: round(0.88 - shift - s * k - 0.003 * seed, 6)  # noqa: E731
    rows = [{"sparsity": s, "realised_sparsity": s, "accuracy": acc(s, 0.6), "accuracy_bnt": acc(s, 0.3)}
            for s in SPARSITIES]  # fmt: skip
    return {"metric": "accuracy", "dense_accuracy": 0.88 - shift - 0.003 * seed, "results": rows}


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every Markdown table in ``text``, parsed here independently of the code under test."""
    out = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip().startswith("|")]
        if lines:
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
            out.append((cells[0], cells[2:]))
    return out


def test_a_wide_sweep_table_is_split_to_fit_and_its_caption_comes_first():
    from varprune.report.tables import MAX_COLUMNS, markdown_blocks, sweep_table

    runs = [(f"{m} seed {s}", _prune_doc(s, 0.01 * i)) for i, m in enumerate(["sgd", "var", "cram+"]) for s in range(3)]
    text = sweep_table(runs)
    assert text.splitlines()[0].startswith("Test accuracy (%) after one-shot magnitude pruning")  # above, not below
    tables = _tables(text)
    assert len(tables) > 1 and all(len(head) <= MAX_COLUMNS for head, _ in tables)
    # every value is in exactly one table, in order, under its own column and on its own run's row
    columns = [c for head, _ in tables for c in head[1:]]
    assert columns == ["dense"] + [f"{100 * s:g}%" for s in SPARSITIES]
    for r, (label, doc) in enumerate(runs):
        cells = [c for _, rows in tables for c in rows[r][1:]]
        assert all(rows[r][0] == label for _, rows in tables)
        expected = [f"{100 * doc['dense_accuracy']:.2f}"] + [
            f"{100 * x['accuracy_bnt']:.2f} / {100 * x['accuracy']:.2f}" for x in doc["results"]
        ]
        assert cells == expected
    # the HTML page takes one table per block, each drawn whole
    blocks, rest = markdown_blocks(text)
    assert len(blocks) == len(tables) and rest == []
    page = render_html("sweep", [{"heading": "h", "tables": blocks}], configs={}, machine={"host": "m"})
    assert page.count("<table") == len(tables)


def test_a_narrow_table_stays_whole():
    from varprune.report.tables import sweep_table

    doc = _prune_doc(0, 0.0)
    doc["results"] = doc["results"][:3]
    assert len(_tables(sweep_table([("sgd", doc)]))) == 1


def test_a_wide_study_table_is_split_with_dense_first_and_time_last():
    from varprune.report.summary import summarize
    from varprune.report.tables import MAX_COLUMNS, study_table

    spec = {"methods": ["sgd", "var"], "seeds": [0, 1, 2], "sparsities": SPARSITIES}
    docs = {(m, s): _prune_doc(s, 0.02 * (m == "var")) for m in spec["methods"] for s in spec["seeds"]}
    text = study_table(summarize(spec, docs, {"sgd": 1.0, "var": 1.5}))
    tables = _tables(text)
    assert len(tables) == 4  # after BN re-tuning and before, each in two parts
    assert all(len(head) <= MAX_COLUMNS for head, _ in tables)
    for first, second in (tables[0:2], tables[2:4]):
        assert first[0][1] == "dense" and second[0][-1] == "time/epoch vs sgd"
        assert first[0][2:] + second[0][1:-1] == [f"{100 * s:g}%" for s in SPARSITIES]
        assert [r[-1] for r in second[1]] == ["1.00x", "1.50x"]
