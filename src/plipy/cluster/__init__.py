"""Scale-out on Ray (`pip install 'plipy[ray]'`): experiment units on an actor pool, an execution backend of the
runtime (`plipy.runtime.driver`). Sweeps over models are `plipy.experiments.sweep`."""

from plipy.cluster.pool import Cluster, Job, RayPool, as_cluster, pool_for, shutdown

__all__ = ["Cluster", "Job", "RayPool", "as_cluster", "pool_for", "shutdown"]
