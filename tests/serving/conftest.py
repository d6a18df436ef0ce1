"""The back ends that start outside this process, each started once for every module that uses it:
a local Ray cluster (``ray_cluster``) and a ZeroGPU Space (``zerogpu_harness``)."""

import pytest

from .ray_cluster import local_cluster
from .zerogpu_harness import zero_gpu_space


@pytest.fixture(scope="package")
def cluster():
    with local_cluster() as started:
        yield started


@pytest.fixture(scope="package")
def space(tmp_path_factory):
    with zero_gpu_space(tmp_path_factory.mktemp("zerogpu")) as served:
        yield served
