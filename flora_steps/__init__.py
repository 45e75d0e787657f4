"""flora: compress Vision Transformers with low-rank factorisation and one-shot rank search."""

__version__ = "0.1.0"
