"""Turn report sections into Markdown and a self-contained HTML page (figures embedded as base64 PNG).

A section is (heading, text, table or None, figure name or None); tables are DataFrames of display
strings. The same sections make both formats, so the Markdown and the HTML never disagree.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass

import pandas as pd


@dataclass
class Section:
    heading: str
    text: str = ""
    table: pd.DataFrame | None = None
    figure: str | None = None  # file name of a PNG in the figures dict
    level: int = 2


def number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def percent(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:+.{digits}f}%" if value else f"{0:.{digits}f}%"


def interval(low, high, fmt=number) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return "–"
    return f"[{fmt(low)}, {fmt(high)}]"


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(title: str, sections: list[Section], figures: dict[str, bytes]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"{'#' * section.level} {section.heading}")
        if section.text:
            parts.append(section.text)
        if section.table is not None and not section.table.empty:
            parts.append(markdown_table(section.table))
        if section.figure and section.figure in figures:
            parts.append(f"![{section.heading}]({section.figure})")
    return "\n\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def to_html(title: str, sections: list[Section], figures: dict[str, bytes], appendix: str = "") -> str:
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for section in sections:
        parts.append(f"<h{section.level}>{html.escape(section.heading)}</h{section.level}>")
        if section.text:
            parts.append("".join(f"<p>{html.escape(p)}</p>" for p in section.text.split("\n\n")))
        if section.table is not None and not section.table.empty:
            parts.append(section.table.to_html(index=False, escape=True, border=0))
        if section.figure and section.figure in figures:
            data = base64.b64encode(figures[section.figure]).decode()
            parts.append(f'<img alt="{html.escape(section.heading)}" src="data:image/png;base64,{data}">')
    if appendix:
        parts.append(
            f"<details><summary>Resolved experiment config</summary><pre>{html.escape(appendix)}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
