# -*- test-case-name: tests.test_config -*-
"""
The broker's configuration: one TOML file, validated against a declarative
schema before anything starts.

Every key has a default and a meaning (docs/configuration.md is the
reference).  A wrong key or value raises L{ConfigError} whose message names
the key by its dotted path, e.g. C{webpubsub.hubs.chat.access_keys[1]}, so
the operator reads one line and knows what to fix.
"""

import json
import math
import os
import re
import tomllib

from twisted.internet.endpoints import serverFromString

from broker.configerrors import KeyLines


class ConfigError(Exception):
    """
    The configuration is unusable; C{str(error)} is the one line to print.
    """

    def __init__(self, key, problem):
        # Problems can quote other libraries' multi-line messages (OpenSSL,
        # TOML); the operator still gets exactly one line.
        problem = " ".join(line.strip() for line in str(problem).splitlines() if line.strip())
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem
        # Where the key is in the file (L{broker.configerrors.KeyLines}),
        # when it was read from one and the key could be found there.
        self.source = None
        self.line = None

    def located(self):
        """
        The error as the operator reads it: C{file:line: key: problem}.
        """
        where = self.source or ""
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        return f"{where}: {self}" if where else str(self)


class ConfigErrors(ConfigError):
    """
    Every problem of one configuration at once, so an operator fixes them
    in one edit rather than one run per mistake.  It reads as its first
    error (C{key}, C{problem}); C{errors} lists them all, in file order
    where known.
    """

    def __init__(self, errors):
        flat = []
        for e in errors:
            flat.extend(e.errors if isinstance(e, ConfigErrors) else [e])
        first = flat[0]
        super().__init__(first.key, first.problem)
        self.errors = flat

    def __str__(self):
        return "\n".join(str(e) for e in self.errors)


class _Errors:
    """
    Collects the problems of a value's parts: a schema check goes on past a
    bad key so that every bad key is reported.
    """

    def __init__(self):
        self.errors = []

    def check(self, f, *args):
        try:
            return f(*args)
        except ConfigError as e:
            self.errors.append(e)
            return None

    def add(self, key, problem):
        self.errors.append(ConfigError(key, problem))

    def raiseAny(self):
        if self.errors:
            raise ConfigErrors(self.errors)


# -- schema primitives ------------------------------------------------------


class _Field:
    def __init__(self, default=None, doc=""):
        self.default = default
        self.doc = doc

    def check(self, key, value):
        raise NotImplementedError

    def defaultValue(self, key):
        return self.check(key, self.default) if self.default is not None else None


class Str(_Field):
    def __init__(self, default=None, doc="", choices=None, nonEmpty=False):
        super().__init__(default, doc)
        self.choices = choices
        self.nonEmpty = nonEmpty

    def check(self, key, value):
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_typename(value)}")
        if self.nonEmpty and not value:
            raise ConfigError(key, "must not be empty")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(key, f"expected one of {', '.join(self.choices)}; got {value!r}")
        return value


class Int(_Field):
    def __init__(self, default=None, doc="", minimum=None, maximum=None):
        super().__init__(default, doc)
        self.minimum = minimum
        self.maximum = maximum

    def check(self, key, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_typename(value)}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(key, f"must be at least {self.minimum}; got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(key, f"must be at most {self.maximum}; got {value}")
        return value


class Float(Int):
    def check(self, key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_typename(value)}")
        value = float(value)
        # TOML allows inf and nan; nan would slip past every range check.
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number; got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(key, f"must be at least {self.minimum}; got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(key, f"must be at most {self.maximum}; got {value}")
        return value


class Bool(_Field):
    def check(self, key, value):
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_typename(value)}")
        return value


class Endpoint(Str):
    """
    A Twisted server endpoint string, parsed (not yet listened on) at load
    time so that a typo or a missing certificate file is reported by key.
    """

    def check(self, key, value):
        value = super().check(key, value)
        try:
            # Parsing needs no reactor; the real one is supplied at listen time.
            endpoint = serverFromString(_NO_REACTOR, value)
        except Exception as e:
            raise ConfigError(key, f"unusable listener {value!r}: {e}")
        # Twisted accepts any integer port when parsing and fails only at
        # bind time; catch the typo here, by key, where that is visible.
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise ConfigError(key, f"unusable listener {value!r}: port must be 0-65535")
        return value


_NO_REACTOR = object()


class List(_Field):
    def __init__(self, item, default=None, doc=""):
        super().__init__(default, doc)
        self.item = item

    def check(self, key, value):
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_typename(value)}")
        errors = _Errors()
        out = [errors.check(self.item.check, f"{key}[{i}]", v) for i, v in enumerate(value)]
        errors.raiseAny()
        return out


class Table(_Field):
    """
    A TOML table with known keys; an unknown key is an error.
    """

    def __init__(self, fields, doc=""):
        super().__init__({}, doc)
        self.fields = fields

    def check(self, key, value):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {_typename(value)}")
        errors = _Errors()
        for k in value:
            if k not in self.fields:
                errors.errors.append(self.unknownKey(key, k))
        out = {}
        for k, field in self.fields.items():
            sub = _join(key, k)
            if k in value:
                out[k] = errors.check(field.check, sub, value[k])
            else:
                out[k] = errors.check(field.defaultValue, sub)
        errors.raiseAny()
        return out

    def unknownKey(self, key, k):
        """
        The L{ConfigError} for the key C{k} this table does not know.
        """
        known = ", ".join(sorted(self.fields))
        return ConfigError(_join(key, k), f"unknown key (known here: {known})")


class Sections(Table):
    """
    The top level: the broker's own sections and one per installed face
    plugin.  An unknown section is most often a face whose plugin is not
    installed (or failed to import), so its error names what is.

    @ivar plugins: the L{broker.plugins.FacePlugins} the faces came from.
    """

    def __init__(self, fields, plugins, doc=""):
        super().__init__(fields, doc)
        self.plugins = plugins

    def unknownKey(self, key, k):
        own = ", ".join(n for n in self.fields if n not in self.plugins.names())
        return ConfigError(_join(key, k),
                           f"unknown section (the broker's own: {own}; installed face plugins: "
                           f"{self.plugins.describe()})")


class MapOf(_Field):
    """
    A table whose keys are names chosen by the operator (hub names) and whose
    values all follow one schema.
    """

    def __init__(self, value, doc="", name=None, nameRule=""):
        super().__init__({}, doc)
        self.value = value
        self.name = name
        self.nameRule = nameRule

    def check(self, key, value):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {_typename(value)}")
        errors = _Errors()
        out = {}
        for k, v in value.items():
            if self.name is not None and not self.name.match(k):
                errors.add(_join(key, k), f"bad name: {self.nameRule}")
            else:
                out[k] = errors.check(self.value.check, _join(key, k), v)
        errors.raiseAny()
        return out


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _join(key, k):
    """
    Append one key to a dotted path, quoted as TOML would need it, so the
    path in a message is the one to type (and never spans lines).
    """
    if not _BARE_KEY.match(k):
        k = json.dumps(k)
    return f"{key}.{k}" if key else k


def _typename(value):
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# -- the schema -------------------------------------------------------------

KIB = 1024
MIB = 1024 * KIB

# The hub names /client/hubs/{hub} accepts (the WebSocket face uses this
# pattern too): a hub configured under any other name could never be reached.
HUB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
HUB_NAME_RULE = "a letter, then up to 127 letters, digits or underscores"

def connectionLimit(default):
    """
    C{max_connections}: a listener's cap on open connections.
    """
    return Int(default, minimum=1, maximum=10_000_000,
               doc="Connections open at once on this listener (all its endpoints); "
                   "one more is accepted and reset at once, and counted.")


class TLSEndpoint(Endpoint):
    """
    A plain C{tcp:} endpoint the face serves with TLS itself.
    """

    def check(self, key, value):
        value = super().check(key, value)
        if not value.startswith(("tcp:", "tcp6:")):
            raise ConfigError(key, f"expected a tcp:... endpoint (the face adds TLS), got "
                                   f"{value!r}")
        return value


def tlsListeners(endpoint, listenDoc, certificateFile):
    """
    A face's TLS listener table: C{listen} (a list of C{endpoint}, plain
    C{tcp:} descriptions the face wraps in TLS), C{certificate} and
    C{private_key}; an empty certificate means a self-signed development
    one generated as C{{state_dir}}/C{certificateFile}.
    """
    return Table({
        "listen": List(endpoint, default=[], doc=listenDoc),
        "certificate": Str("", doc=f"PEM certificate (then its chain); empty: a self-signed "
                                   f"development certificate generated in "
                                   f"{{state_dir}}/{certificateFile}."),
        "private_key": Str("", doc="PEM private key of the certificate; empty: in the "
                                   "certificate file."),
    })


def httpLimits(maxConnections, idleTimeout=60.0):
    """
    The keys every HTTP listener's section has (docs/configuration.md,
    "HTTP listener limits"): C{header_timeout}, C{idle_timeout} and
    C{max_connections}.
    """
    return {
        "header_timeout": Float(10.0, minimum=0.05, maximum=3600,
                                doc="Seconds a connection has to send a complete request "
                                    "head; else 408 and closed."),
        "idle_timeout": Float(idleTimeout, minimum=0.05,
                              doc="Seconds a keep-alive connection may sit silent between "
                                  "requests."),
        "max_connections": connectionLimit(maxConnections),
    }


def inboundRateLimits(bytesPerSecond, unit):
    """
    The keys of a face's inbound rate limit (docs/configuration.md,
    "Admission, rate and group limits"): what one C{unit} (a connection, a
    session) may send per second, and the burst it may save up; 0 turns a
    rate off.
    """
    return {
        "max_inbound_messages_per_second": Float(
            5000.0, minimum=0, doc=f"Messages one {unit} may send per second."),
        "max_inbound_bytes_per_second": Int(
            bytesPerSecond, minimum=0, doc=f"Bytes of messages one {unit} may send per second."),
        "inbound_burst": Float(2.0, minimum=0.1, maximum=60,
                               doc=f"Seconds of either rate a quiet {unit} may save up."),
    }


def schema(plugins=None):
    """
    The whole schema: the broker's own sections, then one section per face
    plugin (L{broker.plugins.IBrokerFace}: its C{section}), so that a face's
    keys live beside the code that reads them and an operator's face plugs
    in its own section.

    @param plugins: the L{broker.plugins.FacePlugins} to take the faces'
        sections from; by default those installed.
    @raise ConfigError: the face plugins cannot be used (see
        L{broker.plugins.findFaces}), or one's section is not a table.
    """
    from broker.plugins import FacePluginError, findFaces

    if plugins is None:
        try:
            plugins = findFaces()
        except FacePluginError as e:
            raise ConfigError("", str(e))
    sections = {
        "broker": Table({
            "state_dir": Str("var", nonEmpty=True,
                             doc="Directory for state files (generated keys, stores)."),
            "drain_timeout": Float(10.0, minimum=0, maximum=600,
                                   doc="Seconds a stop (SIGTERM) waits for sessions to "
                                       "close after telling them; 0 cuts them at once."),
            "log_format": Str("text", choices=("text", "json"),
                              doc="text: twistd's lines; json: one JSON object per line "
                                  "and event (broker/logs.py), for log shippers."),
            "poll_spin_us": Int(0, minimum=0, maximum=10000,
                                doc="Microseconds an idle reactor polls its sockets before "
                                    "it sleeps (adaptive; broker/pollspin.py): lower "
                                    "latency at low load for CPU that would be idle; 0: "
                                    "never."),
        }),
        "admin": Table({
            "listen": List(Endpoint(), default=["tcp:9090:interface=127.0.0.1"]),
            "worker_listen": List(Endpoint(), default=[],
                                  doc="With cluster.workers > 1: each worker's own admin "
                                      "listeners, worker i on the port plus i."),
            "token": Str("", doc="The admin credential (Authorization: Bearer); empty: a "
                                 "random one generated in {state_dir}/admin.token (0600)."),
            "protect_probes": Bool(False, doc="Require the admin token on /healthz, "
                                              "/stats and /metrics too."),
            **httpLimits(100),
        }),
        "cluster": Table({
            "redis_url": Str("", doc="redis://[:password@]host[:port][/db]; empty: one "
                                     "node with the in-memory engine (the default)."),
            "prefix": Str("broker", nonEmpty=True,
                          doc="Prefix of every Redis key and channel: one per cluster."),
            "node_id": Str("", doc="This node's id; empty: host-pid-random."),
            "heartbeat": Float(1.0, minimum=0.05, maximum=60,
                               doc="Seconds between a node's heartbeats."),
            "dead_after": Float(5.0, minimum=0.2, maximum=600,
                                doc="Seconds without a heartbeat before a node's "
                                    "connections are removed cluster-wide."),
            "workers": Int(1, minimum=1, maximum=256,
                           doc="Worker processes sharing the listening ports "
                               "(more than 1 needs redis_url)."),
        }),
    }
    for face in plugins.faces:
        try:
            section = face.section
        except Exception as e:
            raise ConfigError(face.name, f"face plugin {face!r} cannot give its section: "
                                         f"{type(e).__name__}: {e}")
        if not isinstance(section, Table):
            raise ConfigError(face.name, f"face plugin {face!r} gives a section that is not "
                                         "a broker.config.Table")
        sections[face.name] = section
    return Sections(sections, plugins)


def parse(text, source="<string>"):
    """
    Parse and validate TOML text.

    @raise ConfigError: on a syntax error; L{ConfigErrors} for every schema
        violation at once, each with its line in C{text} when it is found.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{source}: not valid TOML: {e}")
    try:
        return schema().check("", raw)
    except ConfigError as e:
        raise locate(ConfigErrors([e]), text, source)


def locate(error, text, source):
    """
    Give each of C{error}'s errors (a L{ConfigErrors}) its C{source} and
    line in C{text}, and sort them by line.

    @return: C{error}.
    """
    lines = KeyLines(text)
    for e in error.errors:
        e.source = source
        e.line = lines.line(e.key) if e.key else None
    error.errors.sort(key=lambda e: (e.line is None, e.line or 0))
    return error


def load(path=None):
    """
    Load the file at C{path}, or the embedded default configuration.
    """
    if path is None:
        return parse(defaultText(), "embedded etc/broker.toml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read configuration {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})")
    return parse(text, os.fspath(path))


def defaultPath():
    """
    Where the embedded default configuration is: copied into the package
    (C{broker/_etc/}) by a regular install, or C{etc/} beside the package in a
    source checkout or an editable install.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "_etc", "broker.toml"),
                      os.path.join(os.path.dirname(here), "etc", "broker.toml")):
        if os.path.exists(candidate):
            return candidate
    raise ConfigError("", "the embedded etc/broker.toml is missing from this installation")


def defaultText():
    with open(defaultPath(), encoding="utf-8") as f:
        return f.read()
