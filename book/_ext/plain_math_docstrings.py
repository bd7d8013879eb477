"""Sphinx extension: let ``minilib`` docstrings write plain-text maths such as ``|S|``.

``minilib``'s docstrings are read in terminals and notebooks (``help(...)``, ``?``) as much as in
this book, so they write cardinalities the way a reader types them: ``φ_i = 1/|T|``,
``min(|S ∩ left|, |S ∩ right|)``. In reStructuredText ``|T|`` is a substitution reference, which
would fail the ``-W`` build ("Undefined substitution referenced"). This extension escapes such
bars in docstrings before they are parsed (after napoleon), so they render literally.

Left alone: inline literals (````x | y````), roles and interpreted text (``:math:`|x|```),
table and line-block lines (starting with ``|`` + space or ``+-``/``+=``), doctest lines and
literal blocks (the indented block after a line ending in ``::``).
"""

from __future__ import annotations

import re

_PROTECTED = re.compile(r"(``.+?``|(?::[\w.+-]+:)?`[^`]*`)")


def _escape_bars(text: str) -> str:
    parts = _PROTECTED.split(text)
    # even indices are outside protected spans; escape unescaped bars there
    return "".join(re.sub(r"(?<!\\)\|", r"\\|", p) if i % 2 == 0 else p for i, p in enumerate(parts))


def escape_docstring_lines(lines: list[str]) -> list[str]:
    """Return ``lines`` with plain-text ``|`` escaped outside literals, tables and code."""
    out: list[str] = []
    literal_indent: int | None = None  # indentation of the line that opened a literal block
    for line in lines:
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if literal_indent is not None:
            if not stripped or indent > literal_indent:
                out.append(line)
                continue
            literal_indent = None
        if (stripped.startswith(("| ", "+-", "+=", ">>>", "... ")) or stripped == "|"
                or stripped.startswith(".. ")):
            out.append(line)
        else:
            out.append(_escape_bars(line) if "|" in line else line)
        if stripped.endswith("::"):
            literal_indent = indent
    return out


def _process(app, what, name, obj, options, lines):  # noqa: ARG001 (Sphinx's signature)
    lines[:] = escape_docstring_lines(lines)


def setup(app):
    # priority > 500 so that napoleon (default priority) has already produced reST
    app.connect("autodoc-process-docstring", _process, priority=600)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
