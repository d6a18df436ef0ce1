"""The composition root: what it loads, and the scheduler's batch sized by the memory plan."""

import pytest
import torch

from nextstep.loading.memory import MEMORY_LIMIT, NotEnoughMemoryError, Workload, plan
from nextstep.serving.compose import largest_batch

from ..conftest import TINY


def test_the_scheduler_gets_the_largest_batch_that_fits(monkeypatch):
    placed = [(str(TINY / "model"), "cpu")]
    plans = {images: plan(TINY / "model", TINY / "vae", torch.float32, None, "cpu",
                          Workload.edit("256x256", images)).peak_bytes for images in (3, 4)}
    monkeypatch.setenv(MEMORY_LIMIT, str((plans[3] + plans[4]) // 2))  # room for 3 images, not 4
    images, [chosen] = largest_batch(placed, str(TINY / "vae"), torch.float32, None, 8)
    assert images == 3 and chosen.peak_bytes == plans[3]
    monkeypatch.setenv(MEMORY_LIMIT, "1MiB")
    with pytest.raises(NotEnoughMemoryError):
        largest_batch(placed, str(TINY / "vae"), torch.float32, None, 8)
