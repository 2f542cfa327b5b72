"""Training only the chosen experts: the batch-structured SFT set, the batch-preserving sampler, the
trainers, expert rows, their config and the train step as a transaction.
"""
