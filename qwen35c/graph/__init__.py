"""qwen35c.graph"""
