#!/usr/bin/env python3
"""The key tables of docs/configuration.md, made from orchagent.config.FIELDS.

    python3 docs/config_table.py          # rewrite the tables in docs/configuration.md
    python3 docs/config_table.py --check  # exit 1 when they differ from FIELDS

The tables sit between the BEGIN/END markers in the document; everything around them is
written by hand.  tests/test_package_docs.py fails when the document and FIELDS disagree.
"""

from __future__ import annotations

import json
import os
import sys

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration.md")
BEGIN = "<!-- BEGIN KEY TABLES: made by docs/config_table.py from orchagent/config.py FIELDS -->"
END = "<!-- END KEY TABLES -->"
_KINDS = {str: "string", int: "integer", bool: "boolean", list: "list of strings",
          dict: "object of strings"}


def _row(field) -> str:
    default = json.dumps(field.default)
    return f"| `{field.key}` | {_KINDS[field.kind]} | `{default}` | {field.doc} |"


def tables(fields) -> str:
    """The Markdown between the markers."""
    parts = []
    for title, ours in (("Keys of the original orchestrator-agent", False),
                        ("Keys orchagent adds", True)):
        parts += [f"### {title}", "", "| Key | Type | Default | Meaning |", "|---|---|---|---|"]
        parts += [_row(f) for f in fields if f.ours == ours]
        parts.append("")
    return "\n".join(parts)


def split(text: str) -> tuple[str, str, str]:
    """(before, tables, after) of the document's text."""
    head, sep, rest = text.partition(BEGIN + "\n")
    body, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"{DOC} lacks the markers {BEGIN!r} / {END!r}")
    return head, body, tail


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from orchagent.config import FIELDS

    with open(DOC, encoding="utf-8") as fh:
        head, body, tail = split(fh.read())
    wanted = tables(FIELDS)
    if "--check" in sys.argv[1:]:
        return 0 if body == wanted else 1
    with open(DOC, "w", encoding="utf-8") as fh:
        fh.write(head + BEGIN + "\n" + wanted + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
