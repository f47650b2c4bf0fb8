"""Tracing by templates: one exported layer per kind, whatever the depth or expert count."""

from __future__ import annotations

import pytest

from qwen35c.graph.trace import layer_kinds, template_config


@pytest.mark.parametrize("preset, kinds", [
    ("tiny", [("linear_attention", False), ("full_attention", False)]),
    ("tiny-next", [("linear_attention", True), ("linear_attention", False), ("full_attention", True)]),
    ("35b-a3b", [("linear_attention", True), ("full_attention", True)]),
])
def test_template_has_one_layer_per_kind(preset, kinds):
    from reference.checkpoint import preset_config

    config = preset_config(preset)
    template, found = template_config(config)
    assert found == kinds
    assert template.num_hidden_layers == len(kinds)
    assert layer_kinds(template) == kinds
    assert template.num_experts == config.num_experts  # experts are stacked: no cost per expert
    assert set(layer_kinds(config)) == set(kinds)
