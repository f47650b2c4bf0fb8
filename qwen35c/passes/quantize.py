"""The `quantize` pass and the weight source that answers its packed tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from qwen35c.graph.ir import Graph, TensorType
from qwen35c.graph.ops import TypeRuleError, register_op
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.quant.formats import Fp8Weight, Int4Weight, gemm_input, int4_rows
from qwen35c.quant.policy import canonical_name, classify, plan
from qwen35c.quant.recipe import Recipe, parse_scheme

__all__ = ["QuantizePass", "quantized_weight_source", "packed_parts", "NOT_LOWERED_REASON"]

NOT_LOWERED_REASON = ("routed experts (stacked weights of grouped_linear / batched_linear, i.e. quantize after "
                      "lower-moe) stay high precision in the graph: only a `moe` op the quantize pass sees whole "
                      "becomes quantized_moe")


def packed_parts(q: Fp8Weight | Int4Weight) -> dict[str, torch.Tensor]:
    if isinstance(q, Fp8Weight):
        parts = {"weight": q.weight, "scale": q.scale}
        if q.activations == "static":
            parts["input_scale"] = q.input_scale
        return parts
    parts = {"qweight": q.qweight, "scales": q.scales}
    for key in ("zeros", "g_idx", "pre_scale"):
        if getattr(q, key) is not None:
            parts[key] = getattr(q, key)
    return parts


def _from_parts(attrs: dict, tensors: list[torch.Tensor]) -> Fp8Weight | Int4Weight:
    it = iter(tensors)
    if attrs["format"] == "fp8":
        codes, scale = next(it), next(it)
        input_scale = next(it) if attrs["activations"] == "static" else None
        return Fp8Weight(codes, scale.float(), attrs["granularity"], attrs["activations"], input_scale)
    qweight, scales = next(it), next(it)
    zeros = next(it) if attrs["has_zeros"] else None
    g_idx = next(it) if attrs["has_g_idx"] else None
    pre = next(it) if attrs["has_pre_scale"] else None
    return Int4Weight(qweight, scales.float(), zeros, attrs["group_size"], g_idx,
                      None if pre is None else pre.float(), act_int8=attrs.get("activations") == "int8",
                      bits=attrs.get("bits", 4))


def _infer(types, attrs):
    x = types[0]
    if x.shape[-1] != attrs["in_features"]:
        raise TypeRuleError(f"quantized_linear: input features {x.shape[-1]} != {attrs['in_features']}")
    return [x.with_shape([*x.shape[:-1], attrs["out_features"]])]


def _impl(inputs, attrs, bindings):
    x = inputs[0]
    q = _from_parts(attrs, inputs[1:])
    return [F.linear(gemm_input(x, q), q.dequantize().to(x.dtype))]


register_op("quantized_linear", _infer, _impl, (3, 7), ("format", "in_features", "out_features"),
            doc="y = fq(x) · dequantize(packed)ᵀ; packed layout in the attributes (qwen35c.quant.formats)")


def _infer_embedding(types, attrs):
    ids, qweight, scales = types
    n, k, g, bits = attrs["out_features"], attrs["in_features"], attrs["group_size"], attrs.get("bits", 4)
    if tuple(qweight.shape) != (n, k * bits // 8) or tuple(scales.shape) != (n, k // g):
        raise TypeRuleError(f"quantized_embedding: packed table {list(qweight.shape)} / scales {list(scales.shape)} "
                            f"do not hold [{n}, {k}] in groups of {g}")
    return [TensorType(attrs["dtype"], (*ids.shape, k))]


def _impl_embedding(inputs, attrs, bindings):
    ids, qweight, scales = inputs
    table = Int4Weight(qweight, scales.float(), None, attrs["group_size"], bits=attrs.get("bits", 4))
    return [int4_rows(table, ids).to(TensorType(attrs["dtype"], ()).torch_dtype)]


register_op("quantized_embedding", _infer_embedding, _impl_embedding, 3,
            ("weight", "group_size", "in_features", "out_features", "dtype"),
            doc="rows of a symmetric INT4 (bits=8: 8-bit) table (a tied LM head's codes, tied-embedding=shared), "
                "dequantized")


def stacked_int4(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Stacked symmetric INT4 experts [E, O, K/2] u8 + [E, O, K/g] -> dequantized [E, O, K] fp32."""
    e, o, half = qweight.shape
    return Int4Weight(qweight.reshape(e * o, half), scales.reshape(e * o, -1).float(), None,
                      group_size).dequantize().view(e, o, 2 * half)


def _infer_moe_q(types, attrs):
    x, router, gu_q, gu_s, down_q, down_s = types
    if not attrs["norm_topk_prob"]:
        raise TypeRuleError("quantized_moe: the top-k weights are always renormalised (norm_topk_prob true)")
    e, g = router.shape[0], attrs["group_size"]
    h, i = x.shape[1], down_q.shape[2] * 2
    want = {"gate_up qweight": (gu_q, (e, 2 * i, h // 2)), "gate_up scales": (gu_s, (e, 2 * i, h // g)),
            "down qweight": (down_q, (e, h, i // 2)), "down scales": (down_s, (e, h, i // g))}
    for what, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise TypeRuleError(f"quantized_moe: {what} {list(t.shape)} != {list(shape)} (E={e}, H={h}, I={i}, group {g})")
    return [x]


def _impl_moe_q(inputs, attrs, bindings):
    """The emulation: the experts dequantized, then the reference moe (fp32 GEMM inputs)."""
    from reference.ops import moe_eager

    x, router, gu_q, gu_s, down_q, down_s = inputs
    g = attrs["group_size"]
    return [moe_eager(x, router, stacked_int4(gu_q, gu_s, g).to(x.dtype), stacked_int4(down_q, down_s, g).to(x.dtype),
                      attrs["top_k"], True)]


register_op("quantized_moe", _infer_moe_q, _impl_moe_q, 6,
            ("top_k", "norm_topk_prob", "group_size", "gate_up", "down"), foldable=False,
            doc="moe(x, router, dequantize(gate_up), dequantize(down)) with renormalised top-k weights (the "
                "norm_topk_prob of every Qwen3.5-MoE; ONNX Runtime's QMoE always renormalises): routed experts in "
                "symmetric INT4, stacked [E, 2I, H/2] (gate rows, then up) and [E, H, I/2] with per-group scales; "
                "fp32 GEMM inputs")


@dataclass
class QuantizeOptions:
    scheme: Literal["fp8-block128", "fp8-tensor", "fp8-channel", "int4", "int4-rtn", "int4-awq", "int4-gptq"] = \
        field(default="fp8-block128", metadata={"help": "format family (int4-* names the algorithm)"})
    group_size: int = field(default=128, metadata={"help": "INT4 group along K"})
    symmetric: bool = field(default=True, metadata={"help": "INT4 zero point 8 (true) or per group"})
    scales: Literal["amax", "mse"] = field(default="amax", metadata={
        "help": "symmetric INT4 scales: amax/7 or the per-group least-squares search (mse)"})
    head_bits: int = field(default=4, metadata={"help": "the LM head's (and a shared embedding's) code width: 4 or 8"})
    act_order: bool = field(default=False, metadata={"help": "GPTQ column order by Hessian diagonal"})
    static_groups: bool = field(default=True, metadata={"help": "GPTQ act-order groups in original order (no g_idx)"})
    activations: Literal["default", "dynamic", "static", "none", "int8"] = \
        field(default="default", metadata={"help": "FP8 activation scales; INT4: none (fp32 GEMM input) or "
                                                  "int8 (per token per group, MatMulNBits accuracy_level 4)"})
    fp32_activations: str = field(default="", metadata={"help": "INT4 activations=int8: globs (';'-separated) of "
                                                                  "linears whose GEMM keeps fp32 inputs (accuracy_level 0)"})
    include: str = field(default="", metadata={"help": "globs (';'-separated) to quantize as well"})
    exclude: str = field(default="", metadata={"help": "globs (';'-separated) to keep high precision"})
    strict_globs: bool = field(default=True, metadata={"help": "a glob matching no tensor is an error (false: "
                                                              "a target's globs, which a cut model may not all match)"})
    tied_embedding: Literal["kept", "shared"] = field(default="kept", metadata={
        "help": "a tied quantized LM head: the embedding keeps its table (kept) or gathers the head's codes (shared)"})
    expert_groups: Literal["fixed", "fit"] = field(default="fixed", metadata={
        "help": "INT4 experts whose dims the group does not divide: kept (fixed) or a smaller group per layer (fit)"})

    def recipe(self) -> Recipe:
        options = {"include": tuple(g for g in self.include.split(";") if g),
                   "exclude": tuple(g for g in self.exclude.split(";") if g), "strict_globs": self.strict_globs}
        if self.scheme.startswith("int4"):
            options.update(group_size=self.group_size, symmetric=self.symmetric, act_order=self.act_order,
                           static_groups=self.static_groups, scales=self.scales, head_bits=self.head_bits)
            if self.activations != "default":
                options["activations"] = self.activations
            options["fp32_activations"] = tuple(g for g in self.fp32_activations.split(";") if g)
        elif self.activations != "default":
            options["activations"] = self.activations
        if self.tied_embedding != "kept":
            options["tied_embedding"] = self.tied_embedding      # the recipe refuses it but for INT4
        if self.expert_groups != "fixed":
            options["expert_groups"] = self.expert_groups
        return parse_scheme(self.scheme, **options)

    def validate(self) -> str | None:
        try:
            self.recipe()
        except Exception as err:  # a QwenError with the reason
            return str(err)
        return None


@register_pass
class QuantizePass(Pass):
    """quantize: linears the precision policy selects become `quantized_linear` over packed weights.
    
    Contract:
      requires: `linear` nodes whose weight is a `weight` node (2-D, checkpoint name).
      ensures:  every selected linear (policy of `qwen35c.quant.policy`, exact names) is replaced by
                `quantized_linear(x, packed...)` whose packed inputs are `weight` nodes named
                `<weight name>#<part>` (parts: fp8 `weight`, `scale`, [`input_scale`]; int4 `qweight`,
                `scales`, [`zeros`], [`g_idx`], [`pre_scale`]); `graph.metadata["quantization"]` holds the
                recipe (`Recipe.to_dict()`) and the quantized / kept names. The weight source must
                answer the `#` names: `quantized_weight_source(base, recipe, quantized)`.
      A whole `moe` op (the pass runs before lower-moe) whose experts the policy quantizes, all of them
      symmetric INT4 at one group with fp32 GEMM inputs, becomes `quantized_moe(x, router,
      <gate_up>#qweight, #scales, <down>#qweight, #scales)` (stacked per-expert units). Experts that
      cannot (FP8, AWQ, int8 activations, a kept unit, norm_topk_prob false) and the stacked weights of
      `grouped_linear` / `batched_linear` (the pass ran after lower-moe: the triton packer quantizes
      those itself), and linears with a bias, are listed under `not_lowered` with `not_lowered_reason`
      and stay high precision; the emulating reference built for `verify` keeps them too. The interpreter runs `quantized_linear` with the
      dequantize twins, i.e. it evaluates the quantization-emulating reference.
    Options: scheme, group-size, symmetric, act-order, include / exclude (globs separated by ';').
    """

    name = "quantize"
    Options = QuantizeOptions

    def run(self, graph: Graph) -> PassResult:
        recipe = self.options.recipe()
        candidates, moes, not_lowered, reasons = [], [], [], set()
        head = graph.outputs[0].producer if graph.outputs else None
        shapes = {}
        for node in graph.nodes:
            if node.op in ("grouped_linear", "batched_linear"):
                # stacked routed-expert weights after lower-moe (rows, w, ...): no quantized lowering
                not_lowered += [v.producer.attrs["name"] for v in node.inputs[1:2]
                                if v.producer is not None and v.producer.op == "weight"]
                reasons.add(NOT_LOWERED_REASON)
            if node.op == "moe" and all(v.producer is not None and v.producer.op == "weight" for v in node.inputs[2:]):
                moes.append(node)
                for v in node.inputs[2:]:
                    shapes[v.producer.attrs["name"]] = tuple(v.type.shape)
            if node.op != "linear" or node.inputs[1].producer is None or node.inputs[1].producer.op != "weight":
                continue
            name = node.inputs[1].producer.attrs["name"]
            if node is head and canonical_name(name) == "model.embed_tokens.weight":
                # a tied LM head reads the embedding's weight node; it is planned (and packed) as
                # lm_head.weight, the embedding lookup keeps the full-precision table
                name = "lm_head.weight"
            if len(node.inputs) == 3:
                not_lowered.append(name)
                reasons.add("linears with a bias stay high precision")
                continue
            candidates.append((node, name))
        for node, name in candidates:
            shapes[name] = tuple(node.inputs[1].type.shape)
        decisions = {d.name: d for d in plan(sorted(shapes.items()), recipe)} if shapes else {}
        lowered_moes = []
        for node in moes:
            stacked = [v.producer.attrs["name"] for v in node.inputs[2:]]
            units = [decisions.pop(n) for n in list(decisions) if decisions[n].source in stacked]
            why = self._moe_blocker(recipe, units, node.attrs["norm_topk_prob"])
            if why is None:
                lowered_moes.append((node, units[0].group_size or recipe.group_size))
                decisions.update((u.name, u) for u in units)
            else:
                not_lowered += stacked
                reasons.add(f"routed experts stay high precision: {why}")
        table = self._shared_table(graph, head, decisions, recipe)
        count = 0
        for node, name in candidates:
            if not decisions[name].quantize:
                continue
            new = self._rewrite(graph, node, name, recipe, anchor=table if node is head else None)
            if table is not None and node is head:
                self._share_embedding(graph, table, new)
            count += 1
        for node, group in lowered_moes:
            self._rewrite_moe(graph, node, recipe, group)
            count += 1
        graph.metadata["quantization"] = {
            "recipe": recipe.to_dict(), "label": recipe.label,
            "quantized": sorted(n for n, d in decisions.items() if d.quantize),
            "kept": sorted(n for n, d in decisions.items() if not d.quantize),
            "kept_reasons": {n: d.reason for n, d in sorted(decisions.items()) if not d.quantize},
            "not_lowered": sorted(set(not_lowered))}
        if recipe.tied_embedding == "shared":
            graph.metadata["quantization"]["embedding"] = (
                f"shared with lm_head.weight ({'8-bit' if recipe.head_bits == 8 else 'INT4'} codes)" if table is not None
                else "kept: the LM head is not a tied, quantized linear in this graph")
        if not_lowered:
            graph.metadata["quantization"]["not_lowered_reason"] = "; ".join(sorted(reasons))
        return PassResult(graph, changed=count > 0, num_matches=count)

    @staticmethod
    def _moe_blocker(recipe: Recipe, units, norm_topk_prob: bool) -> str | None:
        """Why a layer's routed experts cannot become one quantized_moe (all of them symmetric INT4 at one
        group, fp32 GEMM inputs, renormalised top-k weights), or None."""
        if not norm_topk_prob:
            return "norm_topk_prob false: quantized_moe renormalises the top-k weights"
        if not units:
            return "the policy planned no expert units for these stacked weights"
        if not recipe.is_int4:
            return f"{recipe.label}: quantized_moe is INT4 only"
        if not recipe.symmetric or recipe.algorithm == "awq" or (recipe.act_order and not recipe.static_groups):
            return f"{recipe.label}: quantized_moe takes symmetric INT4 without pre-scales or g_idx"
        kept = [u for u in units if not u.quantize]
        if kept:
            return f"{kept[0].name}: {kept[0].reason} (a layer's experts are quantized all together or not at all)"
        if len({u.group_size for u in units}) > 1:
            return f"{units[0].source}: the experts' INT4 groups differ (one group per quantized_moe)"
        a8 = [u.name for u in units if recipe.int8_activations(u.canonical)]
        if a8:
            return (f"{a8[0]}: int8 activations asked for, but the quantized MoE GEMMs take fp32 inputs (add "
                    f"'*.mlp.experts.*' to fp32-activations)")
        return None

    @staticmethod
    def _rewrite_moe(graph: Graph, node, recipe: Recipe, gs: int) -> None:
        """moe(x, router, gate_up, down) -> quantized_moe(x, router, gate_up#qweight, gate_up#scales,
        down#qweight, down#scales) over the stacked packed parts of every expert (INT4 group `gs`)."""
        x, router, gate_up, down = node.inputs
        inputs = [x, router]
        for value in (gate_up, down):
            e, o, k = value.type.shape
            name = value.producer.attrs["name"]
            for part, type_ in (("qweight", TensorType("u8", (e, o, k // 2))), ("scales", TensorType("f32", (e, o, k // gs)))):
                inputs.append(graph.add_node("weight", [], [type_], {"name": f"{name}#{part}"}, before=node).output)
        attrs = {"top_k": node.attrs["top_k"], "norm_topk_prob": node.attrs["norm_topk_prob"], "group_size": gs,
                 "scheme": recipe.label, "gate_up": gate_up.producer.attrs["name"], "down": down.producer.attrs["name"]}
        new = graph.add_node("quantized_moe", inputs, [node.outputs[0].type], attrs, before=node)
        graph.replace_all_uses(node.outputs[0], new.output)
        graph.remove_nodes([node])
        for value in (gate_up, down):
            if not any(value in other.inputs for other in graph.nodes):
                graph.remove_nodes([value.producer])

    @staticmethod
    def _shared_table(graph: Graph, head, decisions: dict, recipe: Recipe):
        """The embedding node that will gather the tied head's codes (tied-embedding=shared), or None."""
        if recipe.tied_embedding != "shared" or head is None or head.op != "linear":
            return None
        decision = decisions.get("lm_head.weight")
        w = head.inputs[1]
        if decision is None or not decision.quantize or w.producer is None or w.producer.op != "weight":
            return None
        # tied: the head reads the embedding's weight node (torch.export names the one parameter
        # lm_head.weight), or the graph says so
        tied = (canonical_name(w.producer.attrs["name"]) == "model.embed_tokens.weight"
                or graph.metadata.get("tie_word_embeddings") is True)
        if not tied:
            return None
        lookups = [n for n in graph.nodes if n.op == "embedding" and (
                   n.inputs[0] is w or (n.inputs[0].producer is not None and n.inputs[0].producer.op == "weight"
                   and canonical_name(n.inputs[0].producer.attrs["name"]) == "model.embed_tokens.weight"))]
        return lookups[0] if len(lookups) == 1 else None

    @staticmethod
    def _share_embedding(graph: Graph, embedding, head_q) -> None:
        """embedding(table, ids) -> quantized_embedding(ids, qweight, scales) over the head's packed parts."""
        a = head_q.attrs
        new = graph.add_node("quantized_embedding", [embedding.inputs[1], head_q.inputs[1], head_q.inputs[2]],
                             [embedding.outputs[0].type],
                             {"weight": a["weight"], "group_size": a["group_size"], "in_features": a["in_features"],
                              "out_features": a["out_features"], "dtype": embedding.outputs[0].type.dtype,
                              **({"bits": a["bits"]} if "bits" in a else {})},
                             before=embedding)
        graph.replace_all_uses(embedding.outputs[0], new.output)
        table = embedding.inputs[0].producer
        graph.remove_nodes([embedding])
        if not any(table.output in other.inputs for other in graph.nodes):
            graph.remove_nodes([table])

    def _rewrite(self, graph: Graph, node, name: str, recipe: Recipe, anchor=None):
        """`node` -> quantized_linear; its packed weight nodes go before `anchor` (default: the node)."""
        n, k = node.inputs[1].type.shape
        x = node.inputs[0]
        attrs = {"weight": name, "scheme": recipe.label, "in_features": k, "out_features": n}
        if recipe.is_fp8:
            g = recipe.fp8_granularity
            parts = [("weight", TensorType("f8e4m3", (n, k))),
                     ("scale", TensorType("f32", {"block": (-(-n // 128), -(-k // 128)), "tensor": (),
                                                  "channel": (n,)}[g]))]
            if recipe.activations == "static":
                parts.append(("input_scale", TensorType("f32", ())))
            attrs.update(format="fp8", granularity=g, activations=recipe.activations)
        else:
            gs, bits = recipe.group_size, recipe.unit_bits(canonical_name(name))
            parts = [("qweight", TensorType("u8", (n, k * bits // 8))), ("scales", TensorType("f32", (n, k // gs)))]
            if not recipe.symmetric:
                parts.append(("zeros", TensorType("u8", (n, k // gs))))
            has_g_idx = recipe.algorithm == "gptq" and recipe.act_order and not recipe.static_groups
            if has_g_idx:
                parts.append(("g_idx", TensorType("i32", (k,))))
            has_pre = recipe.algorithm == "awq"
            if has_pre:
                parts.append(("pre_scale", TensorType(x.dtype, (k,))))
            attrs.update(format="int4", group_size=gs, has_zeros=not recipe.symmetric, has_g_idx=has_g_idx,
                         has_pre_scale=has_pre,
                         activations="int8" if recipe.int8_activations(canonical_name(name)) else "none")
            if bits != 4:
                attrs["bits"] = bits              # absent = 4 (the IR of INT4 graphs predates the option)
        inputs = [x]
        for part, type_ in parts:
            w = graph.add_node("weight", [], [type_], {"name": f"{name}#{part}"}, before=anchor or node)
            inputs.append(w.output)
        new = graph.add_node("quantized_linear", inputs, [node.outputs[0].type], attrs, before=node)
        graph.replace_all_uses(node.outputs[0], new.output)
        weight_node = node.inputs[1].producer
        graph.remove_nodes([node])
        if not any(weight_node.output in other.inputs for other in graph.nodes):
            graph.remove_nodes([weight_node])
        return new


def quantized_weight_source(base: Callable[[str], torch.Tensor], recipe: Recipe,
                            quantized=None) -> Callable[[str], torch.Tensor]:
    """A weight callable answering `<name>#<part>`: packed tensors from `quantized` (a
    QuantizedModel, required for AWQ/GPTQ/static FP8), or data-free RTN/FP8 computed from `base`.
    A stacked expert tensor (`...mlp.experts.gate_up_proj` / `down_proj`) answers its per-expert units
    stacked: [E, 2I, ...] gate rows then up rows per expert, as the checkpoint stores them."""
    from qwen35c.quant.algorithms import rtn

    cache: dict[str, dict[str, torch.Tensor]] = {}

    def unit(name: str, full: Callable[[], torch.Tensor]):
        q = quantized.weights.get(canonical_name(name)) if quantized is not None else None
        if q is None:
            if recipe.needs_calibration:
                raise KeyError(f"{name}: {recipe.label} needs a calibrated QuantizedModel")
            q = rtn(full(), recipe, bits=recipe.unit_bits(canonical_name(name)))
        return q

    def stacked(weight: str) -> dict[str, torch.Tensor]:
        head, _, leaf = weight.rpartition(".")
        projections = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
        whole: list[torch.Tensor] = []

        def tensor() -> torch.Tensor:      # the fp32 stack: read only when a unit is quantized here (RTN)
            if not whole:
                whole.append(base(weight))
            return whole[0]

        experts = 0
        while quantized is not None and canonical_name(f"{head}.{experts}.{projections[0]}.weight") in quantized.weights:
            experts += 1
        per_expert = []
        for e in range(experts or tensor().shape[0]):
            parts = []
            for i, proj in enumerate(projections):
                def rows(e=e, i=i):
                    n = tensor().shape[1] // len(projections)
                    return tensor()[e, i * n:(i + 1) * n]
                parts.append(packed_parts(unit(f"{head}.{e}.{proj}.weight", rows)))
            per_expert.append({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
        return {key: torch.stack([p[key] for p in per_expert]).contiguous() for key in per_expert[0]}

    def fetch(name: str) -> torch.Tensor:
        if "#" not in name:
            return base(name)
        weight, part = name.split("#", 1)
        if weight not in cache:
            if classify(weight) == "experts_fused":
                parts = stacked(weight)
            else:
                parts = packed_parts(unit(weight, lambda: base(weight)))
            if len(cache) >= 4:                 # a few linears at a time (a fused group's members): bounded memory
                cache.pop(next(iter(cache)))
            cache[weight] = parts
        return cache[weight][part]

    return fetch
