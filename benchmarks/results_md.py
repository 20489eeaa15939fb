"""``benchmarks/RESULTS.md`` is shared: the scenario suite writes its body, and every other
benchmark owns one section between ``<!-- name:begin -->`` and ``<!-- name:end -->``
markers. These helpers replace one section, or keep them all, so that no benchmark erases
another's figures."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["marked_sections", "markers", "write_section"]

_SECTION = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.DOTALL)


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between section ``name``'s markers in ``path``, replacing what was
    there, or append the marked section when ``path`` has none."""
    begin, end = markers(name)
    body = body.strip("\n")
    if body.startswith(begin):  # already wrapped
        body = body[len(begin) :].rstrip("\n")
        body = body[: -len(end)] if body.endswith(end) else body
        body = body.strip("\n")
    section = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        text = text[:start] + section + text[stop + len(end) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text if text.endswith("\n") else text + "\n")


def marked_sections(path: Path) -> str:
    """Every marked section of ``path``, in order, each preceded by a blank line (``""``
    when there are none or the file is missing)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    return "".join(f"\n{m.group(0)}\n" for m in _SECTION.finditer(text))
