# -*- test-case-name: tests.test_ecdn -*-
"""
Builds the eCDN face from C{[ecdn]}: the API on each C{ecdn.listen}
endpoint, its rules and key ring reloaded on C{SIGHUP}.
"""

import os
import stat

from twisted.logger import Logger

from broker.config import ConfigError
from broker.ecdn.adminview import EcdnView
from broker.ecdn.keyring import KeyFileError, loadKeyFile, newKeyLine
from broker.ecdn.policy import Policy, RulesError, parseRules
from broker.ecdn.resource import EcdnResource, Metrics, State, makeSite
from broker.files import writePrivate
from broker.plugins import streamListeners

log = Logger()

DEV_KEY_FILE = "ecdn-keys"


def developmentKeyFile(stateDir):
    """
    The development key ring used when no key_file is configured: created
    once with one random key, mode 0600.  Instances sharing a state_dir
    share it; production instances share a configured key_file instead.
    """
    path = os.path.join(stateDir, DEV_KEY_FILE)
    if not os.path.exists(path):
        writePrivate(path, "# Development eCDN key ring (docs/ecdn.md): KID KEY STATUS [UNTIL]\n"
                     + newKeyLine("dev1") + "\n", exclusive=True)
    return path


def loadState(cfg, keyPath):
    """
    Read the rules and the key ring.

    @raise RulesError, KeyFileError: naming the file and line; nothing is
        replaced then.
    """
    rules = []
    if cfg["rules_file"]:
        try:
            with open(cfg["rules_file"], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise RulesError(f"{cfg['rules_file']}: cannot read the rules file: {e}")
        rules, warnings = parseRules(text, cfg["rules_file"])
        for warning in warnings:
            log.warn("ecdn rules: {overlap}", overlap=warning)
    if cfg["policy"] == "rules" and not rules:
        log.warn("ecdn: policy is rules but no rule is loaded; every viewer gets the fallback")
    policy = Policy(cfg["policy"], rules, prefixV4=cfg["subnet_prefix_v4"],
                    prefixV6=cfg["subnet_prefix_v6"], groupSize=cfg["random_group_size"],
                    fallback=cfg["fallback"], fallbackGroup=cfg["fallback_group"])
    mode = os.stat(keyPath).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn("ecdn: the key file {path} is readable by others; chmod 600 it", path=keyPath)
    return State(policy, loadKeyFile(keyPath))


def build(context):
    cfg = context.settings["ecdn"]
    if not cfg["enabled"]:
        return
    if cfg["key_file"]:
        keyPath = cfg["key_file"]
    else:
        try:
            keyPath = developmentKeyFile(context.stateDir)
        except OSError as e:
            raise ConfigError("broker.state_dir", f"cannot keep the eCDN key ring there: {e}")
        log.warn("ecdn.key_file is empty: using the development key ring {path}", path=keyPath)
    try:
        state = loadState(cfg, keyPath)
    except RulesError as e:
        raise ConfigError("ecdn.rules_file", e)
    except (KeyFileError, OSError) as e:
        raise ConfigError("ecdn.key_file", e)
    resource = EcdnResource(state, cfg, context.reactor, Metrics(context.registry))
    context.addAdminView(EcdnView(resource))

    def reload():
        """
        @return: whether the new rules and keys are in force.
        """
        try:
            state = loadState(cfg, keyPath)
        except (RulesError, KeyFileError, OSError) as e:
            log.error("ecdn reload refused, previous rules and keys stay: {error}", error=e)
            return False
        resource.state = state
        log.info("ecdn: rules and keys reloaded")
        return True

    context.onReload(reload)
    resource.reload = reload
    site = makeSite(resource, context.reactor, headerTimeout=cfg["header_timeout"],
                    idleTimeout=cfg["idle_timeout"], stats=context.listeners.get("ecdn.listen"))
    context.listen("ecdn.listen", cfg["listen"], site, cfg["max_connections"])


def listeners(settings):
    """
    The listeners L{build} opens (L{broker.plugins.IBrokerFace.listeners}).
    """
    cfg = settings["ecdn"]
    return streamListeners("ecdn.listen", cfg["listen"]) if cfg["enabled"] else []
