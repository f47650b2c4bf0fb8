"""qwen35c.backends"""
