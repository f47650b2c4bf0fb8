"""A small FileCheck for IR text, and the reader for pass case files.

Directives (one per line, matched in order over the output lines):
  CHECK: pat        pat occurs on a line at or after the previous match
  CHECK-NEXT: pat   pat occurs on the line right after the previous match
  CHECK-NOT: pat    pat does not occur between the previous match and the next CHECK (or the end)
  CHECK-COUNT-n: pat  pat occurs on exactly n lines in the whole output
Patterns are literal text, except `{{regex}}`, `[[NAME:regex]]` (capture) and `[[NAME]]` (reuse).

A case file holds cases separated by a line `# -----`. In a case:
  # Check that <intent>                (required: one line saying what the case shows)
  # RUN: <pipeline text>              (the passes to run)
  # MATCHES: <n>                       (optional: num_matches of the first pass in RUN)
  # ERROR: <text>                      (optional: the pipeline must fail with this text)
  # NUMERIC: skip                      (optional: do not compare before/after by interpretation)
  # CHECK...: <pattern>
and the input graph in the text form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class FileCheckError(AssertionError):
    pass


def _compile(pattern: str, variables: dict[str, str]) -> tuple[re.Pattern, list[str]]:
    out, names, pos = [], [], 0
    token = re.compile(r"\{\{(.*?)\}\}|\[\[([A-Za-z_][A-Za-z0-9_]*)(?::(.*?))?\]\]")
    for m in token.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"(?:{m.group(1)})")
        elif m.group(3) is not None:
            names.append(m.group(2))
            out.append(f"(?P<{m.group(2)}>{m.group(3)})")
        else:
            if m.group(2) not in variables:
                raise FileCheckError(f"pattern uses [[{m.group(2)}]] before it is captured")
            out.append(re.escape(variables[m.group(2)]))
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out)), names


def filecheck(output: str, checks: list[tuple[str, str]]) -> None:
    """Raise FileCheckError with the failing directive and the output when a check fails."""
    lines = output.splitlines()
    variables: dict[str, str] = {}
    pos = 0            # the next line a CHECK may match
    last = -1          # the line of the previous match
    pending_not: list[str] = []

    def error(message: str) -> FileCheckError:
        return FileCheckError(f"{message}\n--- output ---\n{output}")

    def search(pattern: str, start: int, stop: int) -> tuple[int, re.Match] | None:
        regex, _ = _compile(pattern, variables)
        for i in range(start, stop):
            m = regex.search(lines[i])
            if m:
                return i, m
        return None

    def flush_not(stop: int) -> None:
        for pattern in pending_not:
            hit = search(pattern, last + 1, stop)
            if hit:
                raise error(f"CHECK-NOT: {pattern} matched line {hit[0] + 1}: {lines[hit[0]]}")
        pending_not.clear()

    for kind, pattern in checks:
        if kind == "CHECK-NOT":
            pending_not.append(pattern)
            continue
        if kind.startswith("CHECK-COUNT-"):
            n = int(kind.rsplit("-", 1)[1])
            regex, _ = _compile(pattern, variables)
            count = sum(1 for line in lines if regex.search(line))
            if count != n:
                raise error(f"{kind}: {pattern} matched {count} lines, expected {n}")
            continue
        if kind == "CHECK-NEXT":
            if last < 0 or last + 1 >= len(lines):
                raise error(f"CHECK-NEXT: {pattern} has no next line")
            hit = search(pattern, last + 1, last + 2)
            if not hit:
                raise error(f"CHECK-NEXT: {pattern} does not match line {last + 2}: {lines[last + 1]}")
        elif kind == "CHECK":
            hit = search(pattern, pos, len(lines))
            if not hit:
                raise error(f"CHECK: {pattern} not found after line {pos}")
        else:
            raise error(f"unknown directive {kind}")
        flush_not(hit[0])
        variables.update({k: v for k, v in hit[1].groupdict().items() if v is not None})
        last = hit[0]
        pos = hit[0] + 1
    flush_not(len(lines))


@dataclass
class Case:
    intent: str
    pipeline: str
    source: str
    checks: list[tuple[str, str]] = field(default_factory=list)
    matches: int | None = None
    error: str | None = None
    numeric: bool = True
    line: int = 0


_DIRECTIVE = re.compile(r"^\s*#\s*(CHECK(?:-NEXT|-NOT|-COUNT-\d+)?|RUN|MATCHES|ERROR|NUMERIC):\s?(.*)$")


def read_cases(text: str) -> list[Case]:
    cases = []
    line_no = 1
    for chunk in re.split(r"^# -----[^\n]*\n", text, flags=re.M):
        start = line_no
        line_no += chunk.count("\n") + 1
        if not chunk.strip():
            continue
        intent, pipeline, checks, matches, error, numeric = "", None, [], None, None, True
        body = []
        for line in chunk.splitlines():
            m = _DIRECTIVE.match(line)
            if m:
                kind, arg = m.group(1), m.group(2).strip()
                if kind == "RUN":
                    pipeline = arg
                elif kind == "MATCHES":
                    matches = int(arg)
                elif kind == "ERROR":
                    error = arg
                elif kind == "NUMERIC":
                    numeric = arg != "skip"
                else:
                    checks.append((kind, arg))
                continue
            intent_m = re.match(r"^\s*#\s*(Check that .*)$", line)
            if intent_m and not intent:
                intent = intent_m.group(1)
                continue
            body.append(line)
        if pipeline is None and not checks and not any(
                line.strip() and not line.lstrip().startswith("#") for line in body):
            continue  # a header of comments only
        if not intent:
            raise ValueError(f"case at line {start} has no '# Check that ...' intent line")
        if pipeline is None:
            raise ValueError(f"case at line {start} ({intent}) has no '# RUN:' line")
        cases.append(Case(intent, pipeline, "\n".join(body) + "\n", checks, matches, error, numeric,
                          start))
    return cases


__all__ = ["Case", "FileCheckError", "filecheck", "read_cases"]
