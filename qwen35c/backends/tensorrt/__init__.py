"""qwen35c.backends.tensorrt"""
