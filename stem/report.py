"""Rows -> JSON / CSV / markdown / PNG: the one report writer of the benchmarks and `python -m stem evaluate`.

A report is a JSON document `{..., "rows": [row, ...]}`, one dict per measured or evaluated job, and what is
rendered from it: a markdown page, a CSV of the rows, a PNG. What a page or a plot shows belongs to its
caller, who passes it in as a function of the document (`markdown`) or of the rows and a path (`plot`).
Every file is written atomically (a temporary name beside it, renamed into place), so a reader, or a run
killed half-way, never sees half a file.

    doc = {"machine": ..., "rows": merge_rows(read_doc(path)["rows"], new_rows, key=..., order=...)}
    write_report(doc, json_path=path, md_path=page, png_path=figure, markdown=page_of, plot=draw)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from .files import atomic_output


class Column(NamedTuple):
    """A markdown table's column: its title, the cell of a row, right-aligned (numbers) or not."""

    title: str
    cell: Callable[[dict], object]
    right: bool = False


def markdown_table(columns: Sequence[Column], rows: Iterable[dict]) -> str:
    """A markdown table of `rows`, one line each, the cells given by `columns`."""
    lines = ["| " + " | ".join(c.title for c in columns) + " |",
             "|" + "".join("---:|" if c.right else "---|" for c in columns)]
    lines += ["| " + " | ".join(str(c.cell(r)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def read_doc(path: Path) -> dict:
    """The JSON document of `path`, or an empty one (no rows) when there is no file yet."""
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def merge_rows(old: Iterable[dict], new: Iterable[dict], key: Callable[[dict], tuple],
               order: Callable[[dict], object] | None = None) -> list[dict]:
    """`old` rows with `new` ones merged in (a new row replaces an old one with the same key), sorted by `order`."""
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return sorted(merged.values(), key=order) if order else list(merged.values())


def rows_csv(rows: Sequence[dict], first: Sequence[str] = ()) -> str:
    """The rows as CSV: the columns `first` in order, then every other key of any row, sorted; blanks where absent."""
    columns = list(first) + sorted({k for row in rows for k in row} - set(first))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (creating its folder)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, doc: dict, indent: int = 1, allow_nan: bool = True, final_newline: bool = True) -> None:
    """Write `doc` as JSON atomically; with `allow_nan=False` a NaN fails before anything is written."""
    write_text(path, json.dumps(doc, indent=indent, allow_nan=allow_nan) + ("\n" if final_newline else ""))


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out a matplotlib figure, write it to `path` as a PNG (creating the folder), and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)


def write_report(doc: dict, *, json_path: Path | None = None, csv_path: Path | None = None,
                 md_path: Path | None = None, png_path: Path | None = None,
                 markdown: Callable[[dict], str] | None = None, plot: Callable[[list[dict], Path], None] | None = None,
                 csv_first: Sequence[str] = (), indent: int = 1, allow_nan: bool = True,
                 final_newline: bool = True) -> None:
    """Write the files of a report that are asked for, each atomically, in this order.

    Args:
        doc: the document, `{..., "rows": [dict, ...]}`.
        json_path: the document as JSON (`indent`, `allow_nan`, `final_newline` as for `write_json`).
        csv_path: the rows as CSV, the columns `csv_first` first (`rows_csv`).
        md_path: the page `markdown(doc)`.
        png_path: what `plot(doc["rows"], path)` draws (e.g. with `save_figure`).
    """
    if (md_path and markdown is None) or (png_path and plot is None):
        raise ValueError("a markdown page needs `markdown`, a PNG needs `plot`")
    if json_path:
        write_json(json_path, doc, indent, allow_nan, final_newline)
    if csv_path:
        write_text(csv_path, rows_csv(doc["rows"], csv_first))
    if md_path:
        write_text(md_path, markdown(doc))
    if png_path:
        with atomic_output(png_path) as tmp:
            plot(doc["rows"], tmp)
