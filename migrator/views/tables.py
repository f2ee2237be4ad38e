"""Tables for people, drawn by rich: `status`, `batches`, `report` and `audit` print through here,
so columns are sized and aligned in one place rather than padded by hand in each."""
from __future__ import annotations

import io
from typing import Any, Iterable, Sequence

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

# Text output goes to files and pipes as often as to a terminal: wide enough that no line is
# wrapped or cut (an error or a command to run is read, and grepped for, whole). A table takes only
# the width its cells need.
TEXT_WIDTH = 10_000


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = (),
          footer: Sequence[Any] | None = None) -> Table:
    """A table of `rows` under `head`; the columns numbered in `right` aligned right (numbers).
    Cells are taken as plain text: a key name holding brackets is not read as markup."""
    right = set(right)
    shown = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, show_footer=footer is not None)
    for i, name in enumerate(head):
        shown.add_column(name, justify="right" if i in right else "left", no_wrap=True,
                         footer=Text(str(footer[i])) if footer is not None else "")
    for row in rows:
        shown.add_row(*(Text(str(v)) for v in row))
    return shown


def text(*parts: RenderableType | str) -> str:
    """Render tables and lines to plain text (no colour, no escape codes), one after another."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=TEXT_WIDTH, color_system=None, force_terminal=False, highlight=False,
                      markup=False, emoji=False)
    for part in parts:
        console.print(Text(part) if isinstance(part, str) else part)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())
