# -*- test-case-name: tests.test_workers -*-
"""
What the supervisor and its workers agree on: the settings workers need,
the listeners the supervisor opens for them (every face plugin's
C{listeners(settings)}, then the admin listener), and their keys.
"""

from broker.config import ConfigError
from broker.plugins import ListenerSpec, findFaces, streamListeners

# One listener the supervisor opens for every worker (its key, description
# and endpoint(reactor)).
SharedListener = ListenerSpec


def checkSettings(settings):
    """
    @raise ConfigError: for C{cluster.workers} > 1 without the Redis the
        workers share their state through.
    """
    cluster = settings["cluster"]
    if cluster["workers"] > 1 and not cluster["redis_url"]:
        raise ConfigError("cluster.workers",
                          f"{cluster['workers']} workers need cluster.redis_url: the workers "
                          "are cluster nodes and share their state through Redis")


def sharedListeners(settings, plugins=None):
    """
    Every listener a broker with C{settings} opens, by the key its face
    names it with: each configured face plugin's C{listeners(settings)}
    (L{broker.plugins.IBrokerFace.listeners}), in start-up order, then the
    admin listener.  A worker asked to listen on a key missing here refuses
    to start, naming it, and a test checks both agree.

    @param plugins: the L{broker.plugins.FacePlugins}; by default those
        installed.
    """
    if plugins is None:
        plugins = findFaces()
    out = []
    for face in plugins.faces:
        if face.name in settings:
            out.extend(face.listeners(settings))
    out.extend(streamListeners("admin.listen", settings["admin"]["listen"]))
    return out


def workerAdminKey(j, index):
    """
    The name of worker C{index}'s own C{admin.worker_listen[j]} listener.
    """
    return f"admin.worker_listen[{j}]@w{index}"


class Unshareable(Exception):
    """
    A listener that a supervisor cannot open for its workers, or that a
    worker adopted twice.
    """
