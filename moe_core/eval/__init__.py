"""Evaluation and what reads results: before/after metrics, the judge audit, the study's tables,
figures and the HTML report.
"""
