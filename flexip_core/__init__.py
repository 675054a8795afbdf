"""FlexIP: identity-preserving, prompt-editable subject generation on Stable Diffusion 1.5 (arXiv 2504.07405)."""
from __future__ import annotations

import logging

__all__ = ["FlexIPOutput", "FlexIPPipeline", "GateSchedule", "Generation", "GenerationCancelled", "SubjectEmbedding"]


class _NoTorchvisionNotice(logging.Filter):
    """diffusers imports transformers' CLIP and SigLIP image processors, and transformers then warns at every start
    that torchvision is missing. FlexIP preprocesses images itself and does not use them (and torchvision's PyPI
    wheel is not a dependency), so the notice says nothing to our users; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())


def __getattr__(name):  # lazy: `import flexip_core.generation.images` must not pull in torch and diffusers
    if name in ("FlexIPPipeline", "FlexIPOutput", "GenerationCancelled"):
        from flexip_core.generation import pipeline

        return getattr(pipeline, name)
    if name == "GateSchedule":
        from flexip_core.generation.gate import GateSchedule

        return GateSchedule
    if name == "Generation":
        from flexip_core.generation.settings import Generation

        return Generation
    if name == "SubjectEmbedding":
        from flexip_core.generation.encoders import SubjectEmbedding

        return SubjectEmbedding
    raise AttributeError(f"module 'flexip_core' has no attribute {name!r}")
