"""`qwen35c quant-plan MODEL --scheme S`: the precision decision for every tensor of a checkpoint."""

from __future__ import annotations

import click

from qwen35c.commands._common import emit_json


@click.command("quant-plan")
@click.argument("model", required=False)
@click.option("--scheme", required=True,
              type=click.Choice(["fp8-block128", "fp8-tensor", "fp8-channel", "int4", "int4-rtn", "int4-awq",
                                 "int4-gptq"]),
              help="Quantization scheme.")
@click.option("--group-size", type=int, default=128, show_default=True, help="INT4 group size along K.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Quantize tensors whose full name matches (fnmatch; repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Keep tensors whose full name matches in high precision (wins over --include).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(model, scheme, group_size, include, exclude, as_json):
    """Print, for every tensor of MODEL (default: the bundled qwen35-tiny), whether --scheme
    quantizes it and why. Fused routed experts are listed per expert and part."""
    from qwen35c.models import resolve_model
    from qwen35c.quant.policy import plan_checkpoint
    from qwen35c.quant.recipe import parse_scheme

    path = resolve_model(model)
    options = {"include": tuple(include), "exclude": tuple(exclude)}
    if scheme.startswith("int4"):
        options["group_size"] = group_size
    recipe = parse_scheme(scheme, **options)
    decisions = plan_checkpoint(path, recipe)
    quantized = [d for d in decisions if d.quantize]
    if as_json:
        emit_json({"model": str(path), "recipe": recipe.to_dict(), "label": recipe.label,
                   "quantized": len(quantized), "kept": len(decisions) - len(quantized),
                   "tensors": [d.to_dict() for d in decisions]})
        return
    width = max(len(d.name) for d in decisions)
    for d in decisions:
        mark = "Q" if d.quantize else "-"
        click.echo(f"{mark} {d.name:<{width}}  {str(list(d.shape)):<14} {d.role:<18} {d.reason}")
    params = sum(_numel(d.shape) for d in quantized)
    total = sum(_numel(d.shape) for d in decisions)
    click.echo(f"{recipe.label}: {len(quantized)} of {len(decisions)} tensors quantized "
               f"({params / max(total, 1):.1%} of parameters)")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
