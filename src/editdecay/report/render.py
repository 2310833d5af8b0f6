"""Render a built report as `report.md` (figures as files beside it) and a self-contained `report.html`.

The HTML opens offline with nothing beside it: PNG figures are embedded as base64
data URIs, the style sheet is inline, and there are no external links, fonts or
scripts. Tables are real <table> elements; every value cell carries its raw number
in `data-value` (the full-precision fraction behind a percent) or `data-missing`
(the state of a grid cell without a result), so a reader or a test can check the
shown text against the result files. One small inline script runs after the page
has loaded and writes each image's decoded size into `data-natural-width/-height`
and the number of decoded images into `<body data-images-decoded>` (a render
check for headless browsers; the page reads the same without it).
"""

from __future__ import annotations

import base64
import html

from editdecay.core.cache import dumps_json
from editdecay.report.document import Report
from editdecay.report.table import Missing, Table, format_value

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0 1.6em; font-size: .82em; }
caption { text-align: left; font-weight: bold; padding-bottom: .3em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #a33; font-style: italic; text-align: center; background: #fbeeee; }
td.na { color: #999; text-align: center; }
p.desc { font-size: .9em; color: #444; max-width: 70em; }
p.note { font-size: .85em; color: #8a5a00; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; max-width: 70em; }
.warn { color: #8a5a00; } .ok { color: #2a7a2a; }
nav ul { columns: 2; font-size: .9em; }
.scroll { overflow-x: auto; }
"""

RENDER_CHECK = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  imgs.forEach(function (img) {
    img.setAttribute("data-natural-width", img.naturalWidth);
    img.setAttribute("data-natural-height", img.naturalHeight);
    if (img.complete && img.naturalWidth > 0) { ok += 1; }
  });
  document.body.setAttribute("data-images-decoded", ok);
  document.body.setAttribute("data-images-total", imgs.length);
});
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _raw(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def html_table(t: Table) -> str:
    out = [f'<section id="section-{_esc(t.key)}">', f"<h3>{_esc(t.title)}</h3>",
           f'<p class="desc">{_esc(t.description)}</p>']
    out += [f'<p class="note">{_esc(n)}</p>' for n in t.notes]
    out.append(f'<div class="scroll"><table id="table-{_esc(t.key)}" data-key="{_esc(t.key)}">')
    out.append(f"<caption>{_esc(t.title)} ({len(t.rows)} rows)</caption>")
    out.append("<thead><tr>" + "".join(f'<th title="{_esc(c.help)}">{_esc(c.name)}</th>' for c in t.columns)
               + "</tr></thead><tbody>")
    for row in t.rows:
        tds = []
        for value, col in zip(row, t.columns):
            text = _esc(format_value(value, col.kind))
            if isinstance(value, Missing):
                tds.append(f'<td class="missing" data-missing="{_esc(value.state)}">{text}</td>')
            elif value is None:
                tds.append(f'<td class="na" data-value="">{text}</td>')
            elif col.kind == "text":
                tds.append(f"<td>{text}</td>")
            else:
                tds.append(f'<td class="num" data-value="{_esc(_raw(value))}">{text}</td>')
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div></section>")
    return "\n".join(out)


def render_html(report: Report) -> str:
    rs = report.analysis.results
    counts = rs.counts()
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>editdecay report: {_esc(rs.grid)}</title>", f"<style>{CSS}</style></head>",
             '<body data-report="editdecay">', f"<h1>Edit decay report: grid {_esc(rs.grid)}</h1>",
             f'<p>Results directory <code>{_esc(rs.root)}</code>; written {_esc(report.created)} by editdecay '
             f'{_esc(report.version)}. Every number is computed from the cells\' per-request rows.</p>']
    toc = [("summary", "Summary"), ("checks", "Checks"), ("missing", "Missing and failed cells")]
    toc += [(f"section-{t.key}", t.title) for t in report.tables]
    toc += [(f"figure-{f.key}", f.title) for f in report.figures]
    parts.append("<nav><ul>" + "".join(f'<li><a href="#{_esc(k)}">{_esc(v)}</a></li>' for k, v in toc)
                 + "</ul></nav>")
    parts.append('<section id="summary"><h2>Summary</h2><ul>')
    parts.append(f"<li>{len(rs.cells)} planned cells: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                 + "</li>")
    parts += [f"<li>{_esc(line)}</li>" for line in report.summary]
    parts += [f'<li class="warn">{_esc(n)}</li>' for n in rs.notes]
    parts.append("</ul></section>")
    parts.append('<section id="checks"><h2>Checks</h2>')
    if report.analysis.warnings:
        parts.append(f'<p class="warn">{len(report.analysis.warnings)} stored number(s) disagree with the per-request '
                     f'rows they summarise; this points to a bug upstream:</p><ul>')
        parts += [f'<li class="warn">{_esc(w)}</li>' for w in report.analysis.warnings]
        parts.append("</ul>")
    else:
        parts.append('<p class="ok" id="checks-ok">The stored aggregates (metrics, relative decrease, Edit Flip '
                     'Ratio) of every cell agree with its per-request rows.</p>')
    parts.append("</section>")
    parts.append('<section id="missing"><h2>Missing and failed cells</h2>')
    if report.missing.rows:
        parts.append(html_table(report.missing))
    else:
        parts.append('<p class="ok">Every planned cell has a result.</p>')
    parts.append("</section>")
    parts.append('<section id="tables"><h2>Tables</h2>')
    parts += [html_table(t) for t in report.tables]
    parts.append("</section>")
    parts.append('<section id="figures"><h2>Figures</h2>')
    for f in report.figures:
        data = base64.b64encode(f.path.read_bytes()).decode("ascii")
        parts.append(f'<figure id="figure-{_esc(f.key)}"><h3>{_esc(f.title)}</h3>'
                     f'<img alt="{_esc(f.title)}" data-key="{_esc(f.key)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{_esc(f.caption)}</figcaption></figure>")
    parts.append("</section>")
    parts.append(f"<script>{RENDER_CHECK}</script></body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(t: Table) -> str:
    lines = [f"### {t.title}", "", t.description, ""]
    lines += [f"> {n}" for n in t.notes]
    if t.notes:
        lines.append("")
    if not t.rows:
        return "\n".join(lines + ["(no rows)", ""])
    lines.append("| " + " | ".join(_md_cell(c.name) for c in t.columns) + " |")
    lines.append("|" + "|".join("---" if c.kind == "text" else "---:" for c in t.columns) + "|")
    for row in t.formatted():
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines + [""])


def render_markdown(report: Report, figure_dir: str = "figures") -> str:
    rs = report.analysis.results
    counts = rs.counts()
    out = [f"# Edit decay report: grid {rs.grid}", "",
           f"Results directory `{rs.root}`; written {report.created} by editdecay {report.version}. Every number is "
           f"computed from the cells' per-request rows.", "", "## Summary", "",
           f"- {len(rs.cells)} planned cells: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)]
    out += [f"- {line}" for line in report.summary]
    out += [f"- note: {n}" for n in rs.notes]
    out += ["", "## Checks", ""]
    if report.analysis.warnings:
        out.append(f"{len(report.analysis.warnings)} stored number(s) disagree with the per-request rows:")
        out += [f"- WARNING: {w}" for w in report.analysis.warnings]
    else:
        out.append("The stored aggregates of every cell agree with its per-request rows.")
    out += ["", "## Missing and failed cells", ""]
    out.append(md_table(report.missing) if report.missing.rows else "Every planned cell has a result.")
    out += ["", "## Tables", ""]
    out += [md_table(t) for t in report.tables]
    out += ["## Figures", ""]
    for f in report.figures:
        out += [f"### {f.title}", "", f"![{f.title}]({figure_dir}/{f.path.name})", "", f.caption, ""]
    return "\n".join(out) + "\n"


def report_json(report: Report) -> str:
    """The tables' raw values (Missing as {"missing": state}) and the checks, for other tools."""
    def enc(v):
        return {"missing": v.state} if isinstance(v, Missing) else v

    tables = {t.key: {"title": t.title, "columns": [{"name": c.name, "kind": c.kind} for c in t.columns],
                      "rows": [[enc(v) for v in r] for r in t.rows], "notes": list(t.notes)}
              for t in [report.missing, *report.tables]}
    rs = report.analysis.results
    return dumps_json({"kind": "editdecay-report", "grid": rs.grid, "results_dir": str(rs.root),
                       "created": report.created, "version": report.version, "cell_states": rs.counts(),
                       "warnings": list(report.analysis.warnings), "notes": list(rs.notes),
                       "figures": {f.key: f.path.name for f in report.figures}, "tables": tables},
                      indent=1) + "\n"


__all__ = ["html_table", "md_table", "render_html", "render_markdown", "report_json"]
