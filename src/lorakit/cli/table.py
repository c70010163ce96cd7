"""Tables on stdout: rich on a terminal (when installed), aligned plain text otherwise (pipes, logs, tests)."""

from __future__ import annotations

import sys
from typing import TextIO


def print_table(headers: list[str], rows: list[list[str]], stream: TextIO | None = None, title: str = "") -> None:
    """Right-align every column but the first."""
    stream = stream or sys.stdout
    if getattr(stream, "isatty", lambda: False)():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*headers, title=title or None)
            for column in table.columns[1:]:
                column.justify = "right"
            for row in rows:
                table.add_row(*row)
            Console(file=stream).print(table)
            return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    if title:
        stream.write(title + "\n")
    stream.write(line(headers) + "\n")
    stream.write("  ".join("-" * w for w in widths) + "\n")
    for row in rows:
        stream.write(line(row) + "\n")
