"""Rewrite rules written in the spec as small ONNX graphs (``rules:``, ``rewrite_rule``)."""
