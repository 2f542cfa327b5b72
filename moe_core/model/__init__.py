"""Models we can look inside: loading, the MoE adapter per family (routers, fused experts), generation
(HF, vLLM), routing capture, and the offline model organism.
"""
