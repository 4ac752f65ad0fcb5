"""Prefect artifacts that render on their own in the Prefect UI.

A Markdown artifact is stored as text in Prefect's database and shown in the
browser, which cannot follow a path relative to the workspace: `![x](plots/x.png)`
shows a broken image. So the images a report links to are embedded as base64 data
URIs (`![x](data:image/png;base64,...)`), which Prefect's Markdown renderer shows.
The files on disk keep their relative links (they render next to the images in
an editor or on GitHub).
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def embed_images(markdown: str, base_dir: Path) -> str:
    """Replace every `![alt](relative.png)` whose file exists under base_dir by the
    same image as a data URI; links to missing files and URLs are left alone."""
    def inline(match: re.Match) -> str:
        alt, target = match.groups()
        path = base_dir / target
        if "://" in target or target.startswith("data:") or not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{alt}](data:image/png;base64,{data})"
    return _IMAGE.sub(inline, markdown)


def publish_markdown_file(key: str, path: Path, description: str) -> None:
    """A Markdown file as a Prefect artifact, its PNG images embedded."""
    create_markdown_artifact(key=key, markdown=embed_images(path.read_text(encoding="utf-8"), path.parent),
                             description=description)
