"""Pass infrastructure: the registry, typed options, textual pipelines and the pass manager.

A pass is a class registered under a kebab-case name with `@register_pass`. Its docstring starts
with a one-line summary followed by a "Contract:" paragraph; its options are a dataclass
(`Options`) whose fields become the pipeline's `key=value` options (`chunk_size` <-> `chunk-size`),
typed `int`, `float`, `bool`, `str` or `Literal[...]` enums, each with a `help` in its metadata.
`run(graph)` edits the graph in place and returns `PassResult(graph, changed, num_matches)`;
`requires(graph)` / `ensures(graph)` are optional pre/postconditions the manager calls.

Pipelines are text with MLIR's grammar: `cleanup,fuse-deltanet{chunk-size=64},lower-moe,insert-state`
(options inside braces, separated by spaces or commas). A name registered in
`qwen35c/pipelines/*.yaml` (e.g. `standard`) expands to its pipeline text.

`PassManager(pipeline, verify_each=True)` runs the verifier before the pipeline and after every
pass, records per-pass statistics (changed, matches, seconds, node counts), can print the IR after
chosen passes, and calls an `after_pass` hook (used by `qwen35c ir --check-each-pass`). Failures
name the pass and list the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Collection, Literal, TextIO

from qwen35c.errors import QwenError
from qwen35c.graph.ir import Graph
from qwen35c.graph.text import print_graph
from qwen35c.graph.verify import VerificationError, verify
from qwen35c.passes.rewrite import MatchTracer


class PipelineError(QwenError):
    """A pipeline string, pass name or option is wrong; the message says what is accepted."""


class PassFailure(QwenError):
    """A pass broke the graph or its own contract; the message names it and what ran before."""


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    num_matches: int = 0


@dataclass
class NoOptions:
    """This pass takes no options."""


class Pass:
    """Base class. Subclasses set `name`, `Options` and implement `run`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    in_place: ClassVar[bool] = True

    def __init__(self, options: Any | None = None):
        self.options = options if options is not None else self.Options()
        # rule-based passes hand this to `apply_rules`: per-rule match counts always, failure
        # reasons when the manager is asked to explain this pass
        self.tracer = MatchTracer(record_failures=False)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def requires(self, graph: Graph) -> None:
        """Raise PassFailure when the graph is not what this pass expects."""

    def ensures(self, graph: Graph) -> None:
        """Raise PassFailure when the result breaks this pass's promise."""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_text(self) -> str:
        """`name{opt=value ...}` with every option spelled out (the reproducible form)."""
        opts = [f"{_kebab(f.name)}={_format_option(getattr(self.options, f.name))}"
                for f in dataclasses.fields(self.options)]
        return f"{self.name}{{{' '.join(opts)}}}" if opts else self.name


PASSES: dict[str, type[Pass]] = {}
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not _KEBAB.match(cls.name):
        raise ValueError(f"pass name '{cls.name}' must be kebab-case")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass '{cls.name}' is registered twice")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"pass '{cls.name}': Options must be a dataclass")
    PASSES[cls.name] = cls
    return cls


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _load_builtin_passes() -> None:
    """Importing the pass modules registers them; kept here so the registry is always complete."""
    import importlib

    for module in ("cleanup", "fuse_deltanet", "lower_moe", "insert_state", "match_rms_norm",
                   "match_gated_rms_norm", "match_rope", "match_swiglu", "fuse_projections", "quantize"):
        importlib.import_module(f"qwen35c.passes.{module}")


def get_pass_class(name: str) -> type[Pass]:
    _load_builtin_passes()
    if name not in PASSES:
        known = ", ".join(sorted(PASSES))
        raise PipelineError(f"unknown pass '{name}'; known passes: {known}")
    return PASSES[name]


# ---- options -------------------------------------------------------------------------------------

def _convert(pass_name: str, key: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        for choice in choices:
            if raw == _format_option(choice):
                return choice
        raise PipelineError(f"{pass_name}: option '{key}' must be one of "
                            f"{', '.join(_format_option(c) for c in choices)}; got '{raw}'")
    try:
        if kind is bool:
            if raw not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw in ("true", "1")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
    except ValueError:
        raise PipelineError(f"{pass_name}: option '{key}' expects {kind.__name__}, got '{raw}'") from None
    raise PipelineError(f"{pass_name}: option '{key}' has unsupported type {kind}")


def make_options(cls: type[Pass], raw: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls.Options)
    fields = {_kebab(f.name): f for f in dataclasses.fields(cls.Options)}
    values = {}
    for key, text in raw.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise PipelineError(f"{cls.name}: unknown option '{key}'; valid options: {valid}")
        f = fields[key]
        values[f.name] = _convert(cls.name, key, text, hints[f.name])
    options = cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        problem = check()
        if problem:
            raise PipelineError(f"{cls.name}: {problem}")
    return options


def describe_pass(cls: type[Pass]) -> str:
    """Summary, contract and options of a pass (for `--help`-like listings)."""
    lines = [f"{cls.name}: {cls.summary()}"]
    hints = typing.get_type_hints(cls.Options)
    for f in dataclasses.fields(cls.Options):
        kind = hints[f.name]
        kind_text = "|".join(map(_format_option, typing.get_args(kind))) \
            if typing.get_origin(kind) is Literal else kind.__name__
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {_kebab(f.name)}: {kind_text} = {_format_option(default)}  "
                     f"{f.metadata.get('help', '')}")
    return "\n".join(lines)


# ---- pipeline text --------------------------------------------------------------------------------

_ITEM = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(\{([^{}]*)\})?\s*")


def parse_pipeline(text: str, _depth: int = 0) -> list[Pass]:
    """`a,b{k=v k2=v2},c` -> pass instances. Named pipelines from the YAML files expand in place."""
    from qwen35c.pipelines import named_pipelines

    _load_builtin_passes()
    text = text.strip()
    if not text:
        return []
    passes: list[Pass] = []
    pos = 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or not m.group(1):
            raise PipelineError(f"cannot parse pipeline at column {pos + 1}: '{text[pos:]}' "
                                f"(expected name or name{{key=value ...}})")
        name, body = m.group(1), m.group(3)
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise PipelineError(f"cannot parse pipeline at column {pos + 1}: expected ',' "
                                    f"between passes, got '{text[pos]}'")
            pos += 1
            if pos >= len(text) or not text[pos:].strip():
                raise PipelineError("pipeline ends with ','")
        named = named_pipelines()
        if name in named and name not in PASSES and body is None:
            if _depth > 8:
                raise PipelineError(f"named pipeline '{name}' expands recursively")
            passes.extend(parse_pipeline(named[name], _depth + 1))
            continue
        cls = get_pass_class(name)
        raw: dict[str, str] = {}
        if body is not None:
            for item in re.split(r"[\s,]+", body.strip()):
                if not item:
                    continue
                if "=" not in item:
                    raise PipelineError(f"{name}: option '{item}' needs the form key=value")
                key, value = item.split("=", 1)
                if key in raw:
                    raise PipelineError(f"{name}: option '{key}' given twice")
                raw[key] = value
        passes.append(cls(make_options(cls, raw)))
    _check_order(passes)
    return passes


def pipeline_to_text(passes: list[Pass]) -> str:
    return ",".join(p.to_text() for p in passes)


def _check_order(passes: list[Pass]) -> None:
    """Every pass's `must_follow` names passes that, when present, must come earlier."""
    seen: list[str] = []
    for p in passes:
        for earlier in getattr(p, "must_follow", ()):
            names = [q.name for q in passes]
            if earlier in names and earlier not in seen:
                raise PipelineError(f"pass '{p.name}' must run after '{earlier}' in the pipeline")
        seen.append(p.name)


# ---- the manager ----------------------------------------------------------------------------------

@dataclass
class PassStat:
    name: str
    pipeline_text: str
    changed: bool
    num_matches: int
    seconds: float
    nodes_before: int
    nodes_after: int
    rule_matches: dict[str, int] = field(default_factory=dict)   # per rewrite rule, for rule passes
    explanation: str | None = None    # the tracer's report when the pass was explained

    def line(self) -> str:
        rules = "".join(f" {rule}={count}" for rule, count in sorted(self.rule_matches.items()))
        return (f"[pass={self.name}] num_matches={self.num_matches} changed={self.changed} "
                f"nodes={self.nodes_before}->{self.nodes_after} time={self.seconds * 1e3:.1f}ms"
                + (f" rules:{rules}" if rules else ""))


@dataclass
class PipelineResult:
    graph: Graph
    stats: list[PassStat] = field(default_factory=list)


AfterPass = Callable[[Pass, Graph, PassStat], None]


class PassManager:
    def __init__(self, pipeline: str | list[Pass], *, verify_each: bool = True,
                 print_ir_after: Collection[str] | bool = (), stream: TextIO | None = None,
                 log: bool = False, after_pass: AfterPass | None = None,
                 explain: Collection[str] = ()):
        self.passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        unknown = set(explain) - {p.name for p in self.passes}
        if unknown:
            raise PipelineError(f"--explain names pass(es) not in the pipeline: {', '.join(sorted(unknown))}")
        self.explain = set(explain)
        self.verify_each = verify_each
        self.print_ir_after = print_ir_after
        self.stream = stream
        self.log = log
        self.after_pass = after_pass

    @property
    def text(self) -> str:
        return pipeline_to_text(self.passes)

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _verify(self, graph: Graph, after: str, ran: list[str]) -> None:
        try:
            verify(graph)
        except VerificationError as err:
            before = ", ".join(ran[:-1]) or "nothing"
            raise PassFailure(f"IR is invalid {after}: {err} (passes run before it: {before})") \
                from None

    def run(self, graph: Graph) -> PipelineResult:
        result = PipelineResult(graph)
        ran: list[str] = []
        if self.verify_each:
            self._verify(graph, "before the pipeline", ran)
        for p in self.passes:
            ran.append(p.name)
            p.tracer = MatchTracer(record_failures=p.name in self.explain)
            p.requires(graph)
            before = len(graph.nodes)
            start = time.perf_counter()
            out = p.run(graph)
            seconds = time.perf_counter() - start
            if not isinstance(out, PassResult):
                raise PassFailure(f"pass '{p.name}' returned {type(out).__name__}, not PassResult")
            if p.in_place and out.graph is not graph:
                raise PassFailure(f"pass '{p.name}' declares in_place but returned a new graph")
            graph = out.graph
            if self.verify_each:
                self._verify(graph, f"after pass '{p.name}'", ran)
            p.ensures(graph)
            stat = PassStat(p.name, p.to_text(), out.changed, out.num_matches, seconds, before,
                            len(graph.nodes), dict(p.tracer.matches),
                            p.tracer.report() if p.name in self.explain else None)
            result.stats.append(stat)
            if self.log:
                print(stat.line(), file=self._out())
            if self.print_ir_after is True or (self.print_ir_after and p.name in self.print_ir_after):
                print(f"# ----- IR after {p.to_text()} -----", file=self._out())
                print(print_graph(graph), file=self._out())
            if self.after_pass is not None:
                self.after_pass(p, graph, stat)
        result.graph = graph
        return result


def run_pipeline(graph: Graph, pipeline: str, **kwargs: Any) -> PipelineResult:
    return PassManager(pipeline, **kwargs).run(graph)


__all__ = ["NoOptions", "PASSES", "Pass", "PassFailure", "PassManager", "PassResult", "PassStat",
           "PipelineError", "PipelineResult", "describe_pass", "get_pass_class", "make_options",
           "parse_pipeline", "pipeline_to_text", "register_pass", "run_pipeline"]
