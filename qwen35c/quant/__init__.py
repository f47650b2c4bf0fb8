"""Quantization: packed formats, the precision policy, calibration, RTN / AWQ / GPTQ, checkpoint
import/export and the quantization-emulating reference.

Two explicit phases (STYLE lesson 13): `quantize_model` (offline) turns weights into packed tensors
plus scales and a `Recipe` that is recorded as metadata; backends (`qwen35c.backends.onnx.quant`) and
the emulating reference (`emulate`) read the packed tensors and the recipe, never file names.

    recipe = parse_scheme("int4-gptq", group_size=128)
    calib = calibrate.collect(model, batches)
    quantized = quantize_model(model, recipe, calib)
    emulated = emulate(model, quantized)
"""

from qwen35c.quant.formats import Fp8Weight, Int4Weight
from qwen35c.quant.model import QuantizedModel, emulate, quantize_model, weight_errors
from qwen35c.quant.policy import Decision, classify, plan, plan_checkpoint, plan_model
from qwen35c.quant.recipe import SCHEMES, Recipe, parse_scheme

__all__ = ["Fp8Weight", "Int4Weight", "QuantizedModel", "emulate", "quantize_model", "weight_errors",
           "Decision", "classify", "plan", "plan_checkpoint", "plan_model", "SCHEMES", "Recipe", "parse_scheme"]
