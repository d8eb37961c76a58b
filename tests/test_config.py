# -*- test-case-name: tests.test_config -*-
"""
Tests for L{broker.config}: every way a configuration can be wrong is
reported as a L{ConfigError} whose message is one line naming the key.
"""

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config
from broker.config import ConfigError


class ErrorAssertions:
    def assertConfigError(self, text, key, *fragments):
        """
        Parsing C{text} fails with a one-line error that starts with C{key}
        and mentions every fragment.
        """
        e = self.assertRaises(ConfigError, config.parse, text)
        return self.assertOneLine(e, key, *fragments)

    def assertOneLine(self, e, key, *fragments):
        message = str(e)
        self.assertEqual(e.key, key)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(key + ": ") if key else message,
                        f"{message!r} does not start with {key!r}")
        for fragment in fragments:
            self.assertIn(fragment, message)
        return e


class DefaultTests(TestCase):
    def test_embeddedDefaultLoads(self):
        """
        With no path, L{config.load} validates the embedded etc/broker.toml:
        loopback listeners on 8080 (Web PubSub) and 9090 (admin).
        """
        settings = config.load()
        self.assertEqual(settings["webpubsub"]["listen"], ["tcp:8080:interface=127.0.0.1"])
        self.assertEqual(settings["admin"]["listen"], ["tcp:9090:interface=127.0.0.1"])
        self.assertTrue(settings["webpubsub"]["enabled"])
        self.assertIn("chat", settings["webpubsub"]["hubs"])

    def test_defaultPathIsTheShippedFile(self):
        """
        The embedded default is etc/broker.toml (or the packaged copy of it).
        """
        self.assertEqual(os.path.basename(config.defaultPath()), "broker.toml")
        self.assertEqual(config.parse(config.defaultText()), config.load())

    def test_emptyFileMeansDefaults(self):
        """
        Every key has a default: an empty file is a complete configuration.
        """
        settings = config.parse("")
        self.assertEqual(settings["broker"], {"state_dir": "var", "drain_timeout": 10.0,
                                              "log_format": "text", "poll_spin_us": 0})
        self.assertEqual(settings["webpubsub"]["hubs"], {})
        self.assertEqual(settings["webpubsub"]["max_frame_size"], 1024 * 1024)

    def test_hubDefaults(self):
        """
        A hub table gets the defaults of every key it leaves out.
        """
        hub = config.parse("[webpubsub.hubs.chat]\n")["webpubsub"]["hubs"]["chat"]
        self.assertEqual(hub, {"access_keys": [], "allow_anonymous": False,
                               "plain_mode": "sendEvent", "plain_group": "",
                               "anonymous_roles": [],
                               "history_messages": 0, "history_max_age": 3600.0,
                               "history_groups": 10000, "event_log": "",
                               "event_handlers": [], "event_listeners": [], "listeners": [],
                               "max_connections_per_hub": None, "max_groups_per_hub": None})

    def test_limitDefaults(self):
        """
        Every face has admission, rate and group limits on by default,
        under the same key names.
        """
        settings = config.parse("")
        for face in ("webpubsub", "iot", "peergroups"):
            section = settings[face]
            for key in ("max_inbound_messages_per_second",
                        "max_inbound_bytes_per_second", "inbound_burst"):
                self.assertGreater(section[key], 0, f"{face}.{key}")
        self.assertGreater(settings["webpubsub"]["max_connections_per_address"], 0)
        self.assertGreater(settings["iot"]["max_connections_per_address"], 0)
        self.assertGreater(settings["iot"]["udp"]["max_datagrams_per_second"], 0)
        wps = settings["webpubsub"]
        self.assertEqual((wps["max_connections_per_hub"], wps["max_connections_per_user"],
                          wps["max_groups_per_connection"], wps["max_groups_per_hub"],
                          wps["max_group_name_length"]), (100_000, 100, 1000, 100_000, 1024))

    def test_validValues(self):
        """
        Values of the right type and range are returned as given (numbers
        for floats are floats).
        """
        settings = config.parse(
            '[webpubsub]\n'
            'listen = ["tcp:0:interface=127.0.0.1", "unix:/tmp/broker.sock"]\n'
            'access_keys = ["k1", "k2"]\n'
            'auto_ping_interval = 5\n'
            '[webpubsub.hubs.room_1]\n'
            'plain_mode = "sendToGroup"\n'
            'plain_group = "lobby"\n')
        wps = settings["webpubsub"]
        self.assertEqual(wps["listen"], ["tcp:0:interface=127.0.0.1", "unix:/tmp/broker.sock"])
        self.assertEqual(wps["access_keys"], ["k1", "k2"])
        self.assertEqual(wps["auto_ping_interval"], 5.0)
        self.assertIsInstance(wps["auto_ping_interval"], float)
        self.assertEqual(wps["hubs"]["room_1"]["plain_mode"], "sendToGroup")


class UnknownKeyTests(ErrorAssertions, TestCase):
    def test_topLevel(self):
        self.assertConfigError("colour = 1\n", "colour", "unknown section", "webpubsub")

    def test_inSection(self):
        self.assertConfigError("[admin]\nlisten = []\nport = 1\n", "admin.port",
                               "unknown key", "listen")

    def test_tlsListenersArePlainTCP(self):
        """
        The IoT and MQTT faces add TLS themselves: their TLS listeners take
        plain tcp: descriptions, and anything else is refused by key.
        """
        for face in ("iot", "mqtt"):
            self.assertConfigError(f'[{face}.tls]\nlisten = ["unix:/tmp/face.sock"]\n',
                                   f"{face}.tls.listen[0]", "expected a tcp:... endpoint")

    def test_unknownSection(self):
        """
        A section no face plugin gives: the error names the broker's own
        sections and the installed face plugins.
        """
        self.assertConfigError("[nosuchface]\n", "nosuchface", "unknown section",
                               "the broker's own: broker, admin, cluster",
                               "installed face plugins: webpubsub, ecdn, iot, peergroups, mqtt")

    def test_inHubTable(self):
        self.assertConfigError("[webpubsub.hubs.chat]\nplainmode = 'sendEvent'\n",
                               "webpubsub.hubs.chat.plainmode", "unknown key", "plain_mode")

    def test_oddKeyIsQuoted(self):
        """
        A key that is not a bare TOML key is quoted, as it would be written,
        so even a key containing a newline gives a one-line message.
        """
        self.assertConfigError('[webpubsub]\n"max frame\\nsize" = 1\n',
                               'webpubsub."max frame\\nsize"', "unknown key")


class TypeTests(ErrorAssertions, TestCase):
    def test_stringForInt(self):
        self.assertConfigError('[webpubsub]\nmax_frame_size = "1MiB"\n',
                               "webpubsub.max_frame_size", "expected an integer, got a string")

    def test_intForList(self):
        self.assertConfigError("[webpubsub]\nlisten = 8080\n",
                               "webpubsub.listen", "expected a list, got an integer")

    def test_boolForInt(self):
        """
        TOML booleans are not integers here, although Python's are.
        """
        self.assertConfigError("[webpubsub]\nfanout_chunk = true\n",
                               "webpubsub.fanout_chunk", "expected an integer, got a boolean")

    def test_intForBool(self):
        self.assertConfigError("[webpubsub]\nenabled = 1\n",
                               "webpubsub.enabled", "expected true or false, got an integer")

    def test_stringForFloat(self):
        self.assertConfigError('[webpubsub]\nauto_ping_interval = "30s"\n',
                               "webpubsub.auto_ping_interval", "expected a number")

    def test_listItem(self):
        """
        An item of a list is named by its index.
        """
        self.assertConfigError('[webpubsub]\naccess_keys = ["k", 2]\n',
                               "webpubsub.access_keys[1]", "expected a string, got an integer")

    def test_hubListItem(self):
        self.assertConfigError('[webpubsub.hubs.chat]\naccess_keys = ["k", ""]\n',
                               "webpubsub.hubs.chat.access_keys[1]", "must not be empty")

    def test_sectionNotATable(self):
        self.assertConfigError("admin = 1\n", "admin", "expected a table")

    def test_hubNotATable(self):
        self.assertConfigError("[webpubsub.hubs]\nchat = 1\n",
                               "webpubsub.hubs.chat", "expected a table")


class RangeAndChoiceTests(ErrorAssertions, TestCase):
    def test_belowMinimum(self):
        self.assertConfigError("[webpubsub]\nmax_frame_size = 0\n",
                               "webpubsub.max_frame_size", "at least 1", "got 0")

    def test_aboveMaximum(self):
        self.assertConfigError("[webpubsub]\nmax_frame_size = 67108865\n",
                               "webpubsub.max_frame_size", "at most 67108864")

    def test_floatBelowMinimum(self):
        self.assertConfigError("[webpubsub]\nauto_ping_timeout = -0.5\n",
                               "webpubsub.auto_ping_timeout", "at least 0")

    def test_notANumber(self):
        """
        TOML's nan and inf are numbers, but no setting means them; nan
        would otherwise pass every range check.
        """
        self.assertConfigError("[webpubsub]\nauto_ping_interval = nan\n",
                               "webpubsub.auto_ping_interval", "finite")
        self.assertConfigError("[webpubsub]\nauto_ping_timeout = inf\n",
                               "webpubsub.auto_ping_timeout", "finite")

    def test_badChoice(self):
        self.assertConfigError('[webpubsub.hubs.chat]\nplain_mode = "verbose"\n',
                               "webpubsub.hubs.chat.plain_mode", "sendEvent, sendToGroup",
                               "'verbose'")

    def test_badHubChoice(self):
        self.assertConfigError('[webpubsub.hubs.chat]\nplain_mode = "broadcast"\n',
                               "webpubsub.hubs.chat.plain_mode", "sendEvent, sendToGroup")

    def test_emptyStateDir(self):
        self.assertConfigError('[broker]\nstate_dir = ""\n', "broker.state_dir", "empty")

    def test_unreachableHubName(self):
        """
        A hub whose name /client/hubs/{hub} would refuse is an error, not a
        table silently ignored.
        """
        self.assertConfigError('[webpubsub.hubs."chat room"]\n',
                               'webpubsub.hubs."chat room"', "bad name")
        self.assertConfigError('[webpubsub.hubs.1chat]\n', "webpubsub.hubs.1chat", "bad name")


class ListenerTests(ErrorAssertions, TestCase):
    """
    Listener strings are parsed (not listened on) at load time.
    """

    def test_notAPort(self):
        self.assertConfigError('[webpubsub]\nlisten = ["tcp:notaport"]\n',
                               "webpubsub.listen[0]", "unusable listener", "'tcp:notaport'")

    def test_unknownType(self):
        self.assertConfigError('[admin]\nlisten = ["tcp:9090", "bogus:1"]\n',
                               "admin.listen[1]", "unusable listener", "'bogus:1'")

    def test_portOutOfRange(self):
        self.assertConfigError('[webpubsub]\nlisten = ["tcp:65536"]\n',
                               "webpubsub.listen[0]", "0-65535")

    def test_unknownOption(self):
        self.assertConfigError('[webpubsub]\nlisten = ["tcp:0:interfaces=127.0.0.1"]\n',
                               "webpubsub.listen[0]", "unusable listener")

    def test_missingCertificate(self):
        """
        An ssl listener whose certificate file does not exist is refused
        with the file's name.
        """
        missing = FilePath(self.mktemp()).child("server.pem").path
        self.assertConfigError(f'[webpubsub]\nlisten = ["ssl:0:privateKey={missing}"]\n',
                               "webpubsub.listen[0]", "unusable listener", missing)


class FileTests(ErrorAssertions, TestCase):
    def test_invalidTOML(self):
        """
        A syntax error names the source and the position.
        """
        e = self.assertRaises(ConfigError, config.parse, "[webpubsub\nlisten = 1\n", "my.toml")
        self.assertOneLine(e, "", "my.toml", "not valid TOML", "line 1")

    def test_loadFile(self):
        path = FilePath(self.mktemp())
        path.setContent(b'[admin]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
        self.assertEqual(config.load(path.path)["admin"]["listen"],
                         ["tcp:0:interface=127.0.0.1"])

    def test_loadErrorIsThePathsOwn(self):
        path = FilePath(self.mktemp())
        path.setContent(b"[admin]\nlisten = [\n")
        e = self.assertRaises(ConfigError, config.load, path.path)
        self.assertOneLine(e, "", path.path, "not valid TOML")

    def test_missingFile(self):
        missing = FilePath(self.mktemp()).path
        e = self.assertRaises(ConfigError, config.load, missing)
        self.assertOneLine(e, "", missing, "No such file")

    def test_notUTF8(self):
        path = FilePath(self.mktemp())
        path.setContent(b'[broker]\nstate_dir = "\xff"\n')
        e = self.assertRaises(ConfigError, config.load, path.path)
        self.assertOneLine(e, "", path.path, "UTF-8")


class ConfigErrorTests(ErrorAssertions, TestCase):
    def test_multiLineProblem(self):
        """
        A problem quoting another library's multi-line message is folded
        into one line.
        """
        e = ConfigError("webpubsub.listen[0]", "bad certificate:\n  PEM routines\n  no start line\n")
        self.assertOneLine(e, "webpubsub.listen[0]", "bad certificate: PEM routines no start line")
