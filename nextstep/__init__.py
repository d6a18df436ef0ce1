"""NextStep-1 in process: load the official checkpoints, sample image tokens, stream previews."""

from .config import NextStepConfig
from .engine import GenerationResult, StreamEvent
from .hub import ModelNotFoundError
from .pipeline import NextStepPipeline
from .settings import GenerationRequest
from .sizes import Size
from .weights import CheckpointMismatchError

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
