# -*- test-case-name: tests.test_configerrors -*-
"""
The checks of a configuration that the schema cannot make alone, run
before the broker builds anything.

The schema (L{broker.config}) checks each key by itself.  Some problems
are only seen across keys or in the files the keys name (a rules file, a
key ring, a registry): the faces find them while building, and a face
built earlier may by then have written its generated keys under
C{broker.state_dir}.  L{check} runs those checks first, every one of them,
and writes nothing: a configuration that fails leaves the disk as it was,
and reports all its problems in one run.
"""

from broker import config
from broker.config import ConfigError, ConfigErrors


def _cluster(settings):
    from broker.cluster.redis import parseURL
    from broker.workers import checkSettings

    yield checkSettings, (settings,)
    url = settings["cluster"]["redis_url"]
    if url:
        def redisURL():
            try:
                parseURL(url)
            except ValueError as e:
                raise ConfigError("cluster.redis_url", str(e))
        yield redisURL, ()


def _webpubsub(settings):
    from broker.webpubsub.face import checkHandlerURLs

    wps = settings["webpubsub"]
    if not wps["enabled"]:
        return
    for name, hub in wps["hubs"].items():
        # One hub at a time: checkHandlerURLs stops at its first problem.
        yield checkHandlerURLs, ({"hubs": {name: hub}},)


def _peergroups(settings):
    cfg = settings["peergroups"]
    if not cfg["enabled"]:
        return

    def keepalive():
        if cfg["keepalive_timeout"] <= cfg["keepalive_interval"]:
            raise ConfigError("peergroups.keepalive_timeout",
                              "must be longer than peergroups.keepalive_interval")
    yield keepalive, ()


def _ecdn(settings):
    from broker.ecdn.keyring import KeyFileError, loadKeyFile
    from broker.ecdn.policy import RulesError, parseRules

    cfg = settings["ecdn"]
    if not cfg["enabled"]:
        return
    if cfg["rules_file"]:
        def rules():
            try:
                with open(cfg["rules_file"], encoding="utf-8") as f:
                    parseRules(f.read(), cfg["rules_file"])
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError("ecdn.rules_file", f"cannot read the rules file: {e}")
            except RulesError as e:
                raise ConfigError("ecdn.rules_file", e)
        yield rules, ()
    if cfg["key_file"]:
        def keys():
            try:
                loadKeyFile(cfg["key_file"])
            except (KeyFileError, OSError) as e:
                raise ConfigError("ecdn.key_file", e)
        yield keys, ()


def _iot(settings):
    from broker.iot import apikeys
    from broker.iot.auth import Registry, loadRegistryFile

    cfg = settings["iot"]
    if not cfg["enabled"]:
        return
    if cfg["registry_file"]:
        def registry():
            try:
                Registry(loadRegistryFile(cfg["registry_file"]))
            except (OSError, ValueError) as e:
                raise ConfigError("iot.registry_file",
                                  f"cannot load the IoT registry {cfg['registry_file']}: {e}")
        yield registry, ()
    http = cfg["http"]
    if http["enabled"] and http["api_key_file"]:
        def keyFile():
            try:
                apikeys.readKeyFile(http["api_key_file"])
            except (OSError, apikeys.APIKeyError) as e:
                raise ConfigError("iot.http.api_key_file", str(e))
        yield keyFile, ()


CHECKS = (_cluster, _webpubsub, _peergroups, _ecdn, _iot)


def check(settings):
    """
    Run every check on validated C{settings}.

    @raise ConfigErrors: every problem found.
    """
    errors = []
    for checks in CHECKS:
        for f, args in checks(settings):
            try:
                f(*args)
            except ConfigError as e:
                errors.append(e)
    if errors:
        raise ConfigErrors(errors)


def load(path=None):
    """
    L{broker.config.load} then L{check}: the settings the broker can start
    with, or every problem of the file at once.

    @raise ConfigError: the file cannot be read or is not TOML (one
        error); L{ConfigErrors} for every other problem, each with its
        line in the file where the key is written there.
    """
    settings = config.load(path)
    try:
        check(settings)
    except ConfigErrors as e:
        if path is None:
            raise config.locate(e, config.defaultText(), "embedded etc/broker.toml")
        with open(path, encoding="utf-8") as f:
            raise config.locate(e, f.read(), path)
    return settings
