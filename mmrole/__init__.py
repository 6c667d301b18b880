"""mmrole: a Ray-distributed framework for multimodal role-playing agents (MMRole)."""

__version__ = "0.1.0"
