"""The run directory: files written atomically, the manifest, the one-writer lease, provenance, jobs' records.

The lowest layer: it knows nothing of models, prompts or training; everything above stores its
artifacts through it.
"""
