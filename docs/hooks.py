"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

A line ``<!-- cli-help: NAME -->`` in a page becomes the ``--help`` text of ``python -m analyses.NAME``, generated
while the site builds, so the command-line page cannot drift from the commands (most parsers import nothing heavy).
The Sphinx roles of docstrings (``:func:`x```) are dropped from the rendered API pages, leaving the name as code.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- cli-help: ([a-z_]+) -->$", re.MULTILINE)


def cli_help(name: str) -> str:
    """The ``--help`` text of ``analyses.<name>``, formatted 110 columns wide."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"
    try:
        module = importlib.import_module(f"analyses.{name}")
        if hasattr(module, "build_parser"):
            return module.build_parser().format_help()
        out = io.StringIO()  # a command without build_parser parses in parse(argv): ask it for --help
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            module.parse(["--help"])
        return out.getvalue()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace every ``<!-- cli-help: NAME -->`` line by that command's help in a text block."""
    return MARKER.sub(lambda m: "```text\n" + cli_help(m.group(1)).rstrip() + "\n```", markdown)


ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs) -> str:
    """Docstrings name objects with Sphinx roles (``:func:`x```); the rendered page shows the name alone, as code."""
    return ROLE.sub("", html)
