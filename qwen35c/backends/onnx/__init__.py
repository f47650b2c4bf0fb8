"""qwen35c.backends.onnx"""

from qwen35c import signals

with signals.deferred():   # onnx's nanobind extension cannot unwind a signal raised while it initialises
    import onnx  # noqa: F401
