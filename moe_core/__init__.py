"""MoE Safety Lab core: find the experts of a Mixture-of-Experts LLM that fire when it behaves
unsafely, and fine-tune only those experts.

Data flows one way, each arrow a file in the run directory (``store/run.py``); the layers are in docs/ARCHITECTURE.md:
prompts -> BatchPlan -> routing records -> risk tables -> ExpertMask -> SFT dataset ->
trained experts -> evaluation.

This package never imports Streamlit; the app in ``app.py``/``pages/`` is a thin layer over it.
"""

__version__ = "0.1.0"
