"""qwen35c.backends.triton"""
