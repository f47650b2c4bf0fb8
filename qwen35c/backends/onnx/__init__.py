"""qwen35c.backends.onnx"""
