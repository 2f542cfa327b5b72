"""From routing to experts: the analysis job (plan -> routing -> risk tables), risk differences,
selection into an expert mask, and steering at the router.
"""
