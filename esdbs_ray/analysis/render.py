"""Rendering: the report as a list of blocks (headings, paragraphs, lists, tables, figures), written
out as Markdown and as one self-contained HTML page (figures embedded as base64 PNG data URIs, no
remote reference)."""
from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

from .experiment import INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, REFUTED, REPRODUCED

class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level, text, anchor=None):
        self.blocks.append(("h", level, text, anchor))

    def p(self, text):
        self.blocks.append(("p", text))

    def ul(self, items):
        self.blocks.append(("ul", list(items)))

    def table(self, headers, rows, caption=None):
        self.blocks.append(("table", headers, rows, caption))

    def img(self, path, alt, caption):
        self.blocks.append(("img", path, alt, caption))

    def pre(self, text):
        self.blocks.append(("pre", text))

    def markdown(self, out_dir: Path) -> str:
        lines = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif kind == "p":
                lines += [b[1], ""]
            elif kind == "ul":
                lines += [f"- {x}" for x in b[1]] + [""]
            elif kind == "table":
                _, headers, rows, caption = b
                if caption:
                    lines += [f"*{caption}*", ""]
                lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                lines.append("")
            elif kind == "img":
                _, path, alt, caption = b
                if path:
                    lines += [f"![{alt}]({os.path.relpath(path, out_dir)})", "", f"*{caption}*", ""]
                else:
                    lines += [f"*{caption}: {NOT_RUN}*", ""]
            elif kind == "pre":
                lines += ["```", b[1], "```", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                aid = f' id="{b[3]}"' if b[3] else ""
                body.append(f"<h{b[1]}{aid}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                _, headers, rows, caption = b
                cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
                head = "".join(f"<th>{_inline(str(h))}</th>" for h in headers)
                trs = "".join("<tr>" + "".join(f"<td{_cls(c)}>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f'<table>{cap}<thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>')
            elif kind == "img":
                _, path, alt, caption = b
                if path:
                    data = base64.b64encode(Path(path).read_bytes()).decode()
                    body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
                                f'data-file="{html.escape(os.path.basename(path))}"><figcaption>{_inline(caption)}'
                                "</figcaption></figure>")
                else:
                    body.append(f'<p class="notrun"><em>{_inline(caption)}: {NOT_RUN}</em></p>')
            elif kind == "pre":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;
color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}
caption{caption-side:top;text-align:left;font-style:italic;padding:4px 0}
td.ok{background:#e3f6e3}td.bad{background:#fbe3e3}td.inc{background:#fdf6dc}td.nr{background:#eee;color:#666}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;color:#444}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}h2{border-bottom:1px solid #ddd;margin-top:1.6em}
.notrun{color:#777}
"""


_NUMERIC = re.compile(r"[-+]?\d[\d.,]*\s*(%|x|s|pt)?|n/a")


def _cls(c) -> str:
    c = str(c)
    v = {REPRODUCED: ' class="ok"', NOT_REPRODUCED: ' class="bad"', REFUTED: ' class="bad"', INCONCLUSIVE: ' class="inc"',
         NOT_RUN: ' class="nr"'}.get(c, "")
    return v or (' class="num"' if _NUMERIC.fullmatch(c.strip()) else "")


def _md_cell(c) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return t

