"""Rich consoles for the command-line tools, and the one rule for what they print.

On a terminal, rich uses the terminal's width. Anywhere else (a pipe, a file, a CI log, ``$(...)``) it
would fall back to 80 columns and wrap long lines and paths or squeeze tables; output that scripts and
logs read must not be cut, so there lines are never wrapped and tables get ``WIDE`` columns, whatever
``COLUMNS`` says (it describes a terminal, and some tools export ``COLUMNS=80`` to every child process).
Text that comes from users, configuration files or exceptions may contain ``[section]`` names, which rich
would take for markup and drop: it goes through :func:`plain`.
"""

from __future__ import annotations

from typing import Any

WIDE = 240
"""Width of tables and rules when the output is not a terminal."""


def cli_console(*, stderr: bool = False, **kwargs: Any) -> Any:
    """A console that does not wrap or cut lines when the output is not a terminal."""
    from rich.console import Console

    console = Console(stderr=stderr, **kwargs)
    if console.is_terminal or "width" in kwargs:
        return console
    return Console(stderr=stderr, width=WIDE, soft_wrap=True, **kwargs)


def plain(value: object) -> str:
    """``value`` as text rich prints literally (``[evaluation]`` stays ``[evaluation]``)."""
    from rich.markup import escape

    return escape(str(value))
