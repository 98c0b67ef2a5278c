"""The Ray session of a run (``magnet shard``, ``magnet predict --samplesheet``): a cluster's, or a local one."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int = 0, object_store_mb: int = 256, log_to_driver: bool = True):
    """Connect to a cluster (``address``), or start a Ray instance of this process (``num_cpus`` 0: all cores),
    never joining a cluster already running on the machine unless asked; reuse a session already started.
    Workers get everything as values or absolute paths from the driver (their folder and environment are not
    the driver's)."""
    import ray  # start-up time: the CLI imports this module

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=object_store_mb * 2**20, log_to_driver=log_to_driver)
    try:
        yield ray
    finally:
        ray.shutdown()
