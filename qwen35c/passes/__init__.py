"""qwen35c.passes"""
