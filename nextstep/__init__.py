"""NextStep-1 in process: load the official checkpoints, sample image tokens, stream previews."""

from .config import NextStepConfig
from .hub import ModelNotFoundError
from .pipeline import GenerationRequest, GenerationResult, NextStepPipeline, StreamEvent
from .weights import CheckpointMismatchError

__all__ = [
    "CheckpointMismatchError",
    "GenerationRequest",
    "GenerationResult",
    "ModelNotFoundError",
    "NextStepConfig",
    "NextStepPipeline",
    "StreamEvent",
]
