"""`qwen35c ir MODEL`: trace a model to the IR, run a pass pipeline, print the IR.

MODEL is a checkpoint directory (only config.json is read unless --check-each-pass needs weights),
a bundled model name (the default: qwen35-tiny) or a preset name (tiny, tiny-moe, tiny-next, 0.8b,
...; --check-each-pass then uses seeded random weights). The pipeline defaults to the `standard`
one (qwen35c/pipelines/standard.yaml).
"""

from __future__ import annotations

import json

import click

from qwen35c.errors import QwenError


def _reference_model(config, source):
    import torch

    from reference.checkpoint import load_model
    from reference.model import Qwen35ForCausalLM

    if source is not None:
        return load_model(source, torch.float32)
    model = Qwen35ForCausalLM(config).eval()
    model.init_weights(seed=0)
    return model


@click.command("ir")
@click.argument("model", required=False)
@click.option("--pipeline", default="standard", show_default=True, help="Pass pipeline (MLIR grammar).")
@click.option("--print-after-all", is_flag=True, help="Print the IR after every pass (stderr).")
@click.option("--check-each-pass", is_flag=True,
              help="Interpret the IR after every pass and compare with the reference model (prompts of 1, "
                   "65 and 129 tokens and a padded batch, each then 3 decode steps).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of the IR text.")
@click.option("--tolerance", default=1e-4, show_default=True, help="Max abs logit error for --check-each-pass.")
@click.option("--explain", "explain", multiple=True, metavar="PASS",
              help="Print why each candidate of PASS's rewrite rules failed to match (stderr); repeatable.")
@click.option("--dtype", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
              help="Trace in this dtype (bf16 shows the casts the match passes must see through).")
def command(model: str, pipeline: str, print_after_all: bool, check_each_pass: bool, as_json: bool,
            tolerance: float, explain: tuple[str, ...], dtype: str) -> None:
    """Trace MODEL, run the pipeline and print the resulting IR."""
    from qwen35c.graph.serialize import to_json
    from qwen35c.graph.text import print_graph
    from qwen35c.graph.trace import trace_config
    from qwen35c.passes.manager import PassManager, parse_pipeline, pipeline_to_text

    from qwen35c.models import resolve_model_or_preset

    ref = resolve_model_or_preset(model)
    config, source = ref.config(), ref.path
    resolved = pipeline_to_text(parse_pipeline(pipeline))  # fail fast on a bad pipeline
    import torch

    traced = trace_config(config, {"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    report = None
    if explain and check_each_pass:
        raise QwenError("--explain and --check-each-pass cannot be combined; run them separately")
    if check_each_pass:
        from qwen35c.passes.parity import check_each_pass as check

        graph, stats, report = check(traced.graph, resolved, _reference_model(config, source),
                                     tolerance=tolerance)
    else:
        result = PassManager(resolved, verify_each=True, print_ir_after=print_after_all,
                             explain=explain).run(traced.graph)
        graph, stats = result.graph, result.stats
    if as_json:
        doc = {"model": ref.label, "pipeline": resolved,
               "trace": {"export_seconds": traced.export_seconds, "import_seconds": traced.import_seconds,
                         "template_layers": traced.template_layers},
               "passes": [{"name": s.name, "options": s.pipeline_text, "changed": s.changed,
                           "num_matches": s.num_matches, "rule_matches": s.rule_matches,
                           "explanation": s.explanation, "seconds": s.seconds,
                           "nodes_before": s.nodes_before, "nodes_after": s.nodes_after} for s in stats],
               "graph": to_json(graph)[0]}
        if report is not None:
            doc["parity"] = report.to_json()
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(print_graph(graph), nl=False)
        for s in stats:
            click.echo(s.line(), err=True)
            if s.explanation is not None:
                click.echo(f"# ----- explain {s.pipeline_text} -----", err=True)
                click.echo(s.explanation or "(no rule of this pass was tried)", err=True)
        if report is not None:
            for p in report.passes:
                click.echo(f"[parity] {p.name}: max_abs_err={p.max_abs_err:.3g} (at {p.worst_case}) "
                           f"top1={p.top1_agreement:.3f} {'ok' if p.ok else 'BROKEN'}", err=True)
    if report is not None and report.first_broken:
        raise QwenError(f"parity broken first by pass '{report.first_broken}' (tolerance {tolerance})")
