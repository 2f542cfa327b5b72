"""Prompt sets and mixed batches: loading prompts, composing batches (safe first, then unsafe), the
batch plan file and its hand edits.
"""
