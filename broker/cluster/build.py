# -*- test-case-name: tests.test_cluster_engine -*-
"""
Cluster mode from the C{[cluster]} configuration section: the Redis link,
this node's L{Cluster} and the L{RedisEngine} the core publishes through.
"""

from twisted.application import service
from twisted.internet import defer

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient, parseURL
from broker.config import ConfigError


def buildCluster(reactor, settings):
    """
    @return: C{None} without C{cluster.redis_url} (one node, in-memory
        engine); otherwise a started-with-the-broker L{Cluster} whose
        C{redis} is its L{RedisClient}.
    @raise ConfigError: for an unusable C{redis_url}.
    """
    cfg = settings["cluster"]
    if not cfg["redis_url"]:
        return None
    try:
        parseURL(cfg["redis_url"])
    except ValueError as e:
        raise ConfigError("cluster.redis_url", str(e))
    redis = RedisClient(reactor, cfg["redis_url"])
    return Cluster(reactor, redis, prefix=cfg["prefix"], nodeId=cfg["node_id"] or None,
                   heartbeat=cfg["heartbeat"], deadAfter=cfg["dead_after"])


class ClusterService(service.MultiService):
    """
    The Redis link and the node as one service: started link first, and
    stopped node first, waiting for it to leave the cluster (its hooks
    need Redis) before the link closes.
    """

    def __init__(self, cluster):
        super().__init__()
        self.cluster = cluster
        cluster.redis.setServiceParent(self)
        cluster.setServiceParent(self)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        yield self.cluster.stopService()
        yield self.cluster.redis.stopService()
