"""Named pipelines: each `*.yaml` file here defines one pipeline by stage.

A file lists `stages`, each a list of `{pass: name, options: {...}, enabled: bool, why: text}`
entries; a disabled entry keeps its place and says why. `named_pipelines()` returns
`{file stem: pipeline text}`, which `parse_pipeline` expands when the name appears in a pipeline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

HERE = Path(__file__).parent


def _entry_text(entry: dict) -> str:
    options = entry.get("options") or {}
    if not options:
        return entry["pass"]
    parts = []
    for key, value in options.items():
        parts.append(f"{key}={'true' if value is True else 'false' if value is False else value}")
    return f"{entry['pass']}{{{' '.join(parts)}}}"


def pipeline_from_yaml(path: Path) -> str:
    doc = yaml.safe_load(path.read_text())
    items = []
    for stage in doc["stages"]:
        for entry in stage["passes"]:
            if entry.get("enabled", True):
                items.append(_entry_text(entry))
    return ",".join(items)


@lru_cache(maxsize=None)
def named_pipelines() -> dict[str, str]:
    return {path.stem: pipeline_from_yaml(path) for path in sorted(HERE.glob("*.yaml"))}


__all__ = ["named_pipelines", "pipeline_from_yaml"]
