"""Scale-out on Ray (`pip install 'plipy[ray]'`): experiment units on an actor pool, sweeps over models."""

from plipy.cluster.pool import Cluster, Job, RayPool, as_cluster, pool_for, shutdown

__all__ = ["Cluster", "Job", "RayPool", "as_cluster", "pool_for", "shutdown"]
