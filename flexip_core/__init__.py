"""FlexIP: identity-preserving, prompt-editable subject generation on Stable Diffusion 1.5 (arXiv 2504.07405)."""
from __future__ import annotations

__all__ = ["FlexIPOutput", "FlexIPPipeline", "GenerationCancelled", "SubjectEmbedding"]


def __getattr__(name):  # lazy: `import flexip_core.images` must not pull in torch and diffusers
    if name in ("FlexIPPipeline", "FlexIPOutput", "GenerationCancelled"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "SubjectEmbedding":
        from .encoders import SubjectEmbedding

        return SubjectEmbedding
    raise AttributeError(f"module 'flexip_core' has no attribute {name!r}")
