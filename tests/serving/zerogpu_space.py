"""The page as a ZeroGPU Space serves it, on a CPU: ``python -m tests.serving.zerogpu_space MODEL VAE PORT``.

Started by tests/serving/zerogpu_harness.py with ZeroGPU's environment (``SPACES_ZERO_GPU``, the device API's
address, spaces' offload and prune paths). Everything is spaces' own code (CUDA emulation while
loading, packing the weights at launch, forking a worker per GPU, pickling the arguments and every
frame across, Stop), except what needs a real GPU, faked here:

* What spaces reads from a CUDA build of torch at import, which a CPU build lacks: its CUDA version,
  the low-level CUDA init (kept to restore in the worker: here it refuses), and whether CUDA was
  initialised before a fork (a picklable "no": spaces asks in a child process).
* ``spaces.zero.torch.init``: the worker's CUDA start-up (it makes a tensor on the GPU).
* ``spaces.zero.torch.move``: the worker's move of every emulated tensor into the GPU. Here each gets
  its host data back instead, read from spaces' offload file as spaces' own move reads it.

The device API (scheduling, allowing, releasing) is the test's HTTP server; spaces' client talks to it.
"""

from __future__ import annotations

import sys
from itertools import chain

import torch


def _no_cuda_init():
    raise RuntimeError("this machine has no CUDA: nothing here may initialise it")


def _not_in_bad_fork() -> bool:
    return False


# Before spaces is imported: see above.
torch.version.cuda = "12.8"
torch._C._cuda_init = _no_cuda_init
torch.cuda._is_in_bad_fork = _not_in_bad_fork

import spaces.zero.torch as zero_torch  # noqa: E402 - after the fake above, before anything touches CUDA
from spaces.zero.torch import patching  # noqa: E402


def move_to_host(callback=None) -> None:
    """Stands in for spaces' move into the GPU: every emulated tensor takes its host data."""
    for fake, original in patching.cuda_aliases.items():
        if original is not None:  # not packed yet
            fake.data = original
    for pack in patching.tensor_packs:  # packed at launch: tensors in order, each padded to a page
        with open(pack.path(), "rb") as file:
            for meta, size, padded in chain(chain.from_iterable(pack.batches), pack.big_tensors):
                data = file.read(padded)[:size]
                host = (torch.frombuffer(bytearray(data), dtype=torch.uint8).view(meta.dtype) if size
                        else torch.empty(0, dtype=meta.dtype)).as_strided(meta.shape, meta.stride())
                for fake in pack.fakes[meta]:
                    fake.data = host


zero_torch.init = lambda nvidia_uuid: None
zero_torch.move = move_to_host

import app  # noqa: E402
from nextstep.loading.options import RuntimeOptions  # noqa: E402
from nextstep.page.layout import build_demo, launch  # noqa: E402
from nextstep.serving.examples import SHAPES_EXAMPLES  # noqa: E402

from ..conftest import deliver_previews_before_next_token  # noqa: E402
from .holds import holding_on_zero_gpu  # noqa: E402


def main(model: str, vae: str, port: int) -> None:
    torch.set_num_threads(1)  # the CPU policy of the tests (the "GPU" here is the CPU)
    # The "GPU" here is the CPU, where no CUDA graph can be captured: the eager step (ZeroGPU runs "graph").
    options = RuntimeOptions(model=model, vae=vae, dtype="float32", step="eager")
    services = app.serve_models(options, frame_interval=0.0)
    deliver_previews_before_next_token(services.generator.pipe.engine)  # as many previews on any machine
    holding_on_zero_gpu(services.generator.pipe.engine)  # HOLD requests run until stopped
    # Examples, so that the test sees none of them run at start-up (they are cached lazily).
    services.examples = {"text_to_image": SHAPES_EXAMPLES, "edit": SHAPES_EXAMPLES}
    launch(build_demo(services), "127.0.0.1", port, quiet=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
