"""NextStep-1 in process: load the official checkpoints, sample image tokens, stream previews."""

from .engine.core import GenerationResult, StreamEvent
from .engine.settings import GenerationRequest
from .engine.sizes import Size
from .loading.checkpoints import CheckpointMismatchError
from .loading.hub import ModelNotFoundError
from .models.config import NextStepConfig
from .pipeline import NextStepPipeline

__all__ = [
    "CheckpointMismatchError",
    "GenerationRequest",
    "GenerationResult",
    "ModelNotFoundError",
    "NextStepConfig",
    "NextStepPipeline",
    "Size",
    "StreamEvent",
]
