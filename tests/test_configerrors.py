# -*- test-case-name: tests.test_configerrors -*-
"""
Tests for L{broker.configerrors} and L{broker.preflight}: every problem of
a configuration in one run, each with its key and line, and a start that
fails writing nothing.
"""

import io
import os

from twisted.internet import defer
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, configerrors, preflight
from broker.config import ConfigErrors
from broker.configerrors import KeyLines, splitKey
from tests.test_tap import TwistdTestsMixin


def lineOf(text, fragment):
    """
    The 1-based line of the first line of C{text} containing C{fragment}.
    """
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


class SplitKeyTests(TestCase):
    def test_parts(self):
        self.assertEqual(splitKey("a.b[2].c"), ("a", "b", "[2]", "c"))
        self.assertEqual(splitKey('webpubsub.hubs."a.b".x'), ("webpubsub", "hubs", "a.b", "x"))
        self.assertEqual(splitKey("iot.udp.listen[0]"), ("iot", "udp", "listen", "[0]"))


class KeyLinesTests(TestCase):
    TEXT = """\
# a comment
[broker]
state_dir = "var"

[webpubsub]
listen = [
  "tcp:1",
  "tcp:2",
]
hubs.other.plain_mode = "x"

[webpubsub.hubs."odd name"]
anonymous_connect = true
note = '''
fake = 1
[not.a.table]
'''

[[webpubsub.hubs.chat.event_handlers]]
url_template = "http://a"

[[ webpubsub.hubs.chat.event_handlers ]]
url_template = "http://b"

[webpubsub.hubs.chat.event_handlers.auth]
mode = "y"

[iot]
"quoted key" = 1
"""

    def setUp(self):
        self.lines = KeyLines(self.TEXT)

    def at(self, fragment):
        return lineOf(self.TEXT, fragment)

    def test_keyUnderTable(self):
        self.assertEqual(self.lines.line("broker.state_dir"), self.at("state_dir"))

    def test_listItemIsItsKey(self):
        """
        An item of a list is reported at the line of the list's key.
        """
        self.assertEqual(self.lines.line("webpubsub.listen[1]"), self.at("listen = ["))

    def test_dottedKey(self):
        self.assertEqual(self.lines.line("webpubsub.hubs.other.plain_mode"),
                         self.at("hubs.other.plain_mode"))

    def test_quotedHeader(self):
        self.assertEqual(self.lines.line('webpubsub.hubs."odd name".anonymous_connect'),
                         self.at("anonymous_connect"))
        self.assertEqual(self.lines.line('iot."quoted key"'), self.at('"quoted key"'))

    def test_arrayOfTables(self):
        """
        C{[[...]]} headers count per path: the second element's keys are
        found under index 1, and a table header after them belongs to the
        latest element.
        """
        self.assertEqual(self.lines.line("webpubsub.hubs.chat.event_handlers[0].url_template"),
                         self.at('"http://a"'))
        self.assertEqual(self.lines.line("webpubsub.hubs.chat.event_handlers[1].url_template"),
                         self.at('"http://b"'))
        self.assertEqual(self.lines.line("webpubsub.hubs.chat.event_handlers[1].auth.mode"),
                         self.at('mode = "y"'))

    def test_multilineString(self):
        """
        What looks like a key or a header inside a multi-line string is not
        one.
        """
        self.assertIsNone(self.lines.line("not.a.table"))
        self.assertEqual(self.lines.line('webpubsub.hubs."odd name".fake'),
                         self.at('[webpubsub.hubs."odd name"]'))

    def test_missingKeyFallsBackToItsTable(self):
        """
        A key the file leaves to its default is reported at its table.
        """
        self.assertEqual(self.lines.line("broker.drain_timeout"), self.at("[broker]"))
        self.assertIsNone(self.lines.line("cluster.workers"))


class CollectedErrorsTests(TestCase):
    TEXT = """\
[broker]
drain_timeout = "soon"

[admin]
listen = ["tcp:1:interface=127.0.0.1", "tcp:70000"]
colour = "blue"

[iot.udp]
port = -1
"""

    def test_everyErrorAtOnce(self):
        """
        Parsing goes on past a bad key: every problem is in one
        L{ConfigErrors}, in file order, each with its key and line.
        """
        e = self.assertRaises(ConfigErrors, config.parse, self.TEXT, "b.toml")
        found = [(x.key, x.line) for x in e.errors]
        self.assertEqual(found, [
            ("broker.drain_timeout", lineOf(self.TEXT, "drain_timeout")),
            ("admin.listen[1]", lineOf(self.TEXT, "listen")),
            ("admin.colour", lineOf(self.TEXT, "colour")),
            ("iot.udp.port", lineOf(self.TEXT, "port = -1")),
        ])
        self.assertEqual(e.errors[0].located(),
                         f"b.toml:{lineOf(self.TEXT, 'drain_timeout')}: "
                         "broker.drain_timeout: expected a number, got a string")

    def test_oneErrorReadsAsBefore(self):
        """
        With one problem the error reads as that problem: one line starting
        with its key (what a C{SIGHUP} reload logs).
        """
        e = self.assertRaises(ConfigErrors, config.parse, "[iot]\nmax_queue_depth = 0\n")
        self.assertEqual(e.key, "iot.max_queue_depth")
        self.assertTrue(str(e).startswith("iot.max_queue_depth: must be at least"), str(e))
        self.assertNotIn("\n", str(e))

    def test_report(self):
        e = self.assertRaises(ConfigErrors, config.parse, self.TEXT, "b.toml")
        out = io.StringIO()
        configerrors.report(e, out.write)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], "broker: the configuration has 4 errors:")
        self.assertEqual(len(lines), 5)
        self.assertTrue(all(line.startswith("  b.toml:") for line in lines[1:]), lines)


class PreflightTests(TestCase):
    """
    The checks the schema cannot make alone (across keys, in the files
    keys name) are all made before anything is built, and write nothing.
    """

    def test_semanticErrorsCollected(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        state = directory.child("state")
        missing = directory.child("no-such-rules").path
        path = directory.child("broker.toml")
        text = (f'[broker]\nstate_dir = "{state.path}"\n'
                '[cluster]\nworkers = 2\n'
                '[[webpubsub.hubs.chat.event_handlers]]\nurl_template = "ftp://x/{event}"\n'
                '[peergroups]\nenabled = true\nkeepalive_interval = 30\n'
                'keepalive_timeout = 10\n'
                f'[ecdn]\nenabled = true\nrules_file = "{missing}"\n')
        path.setContent(text.encode("utf-8"))
        e = self.assertRaises(ConfigErrors, preflight.load, path.path)
        found = [(x.key, x.line) for x in e.errors]
        self.assertEqual(found, [
            ("cluster.workers", lineOf(text, "workers")),
            ("webpubsub.hubs.chat.event_handlers[0].url_template", lineOf(text, "ftp:")),
            ("peergroups.keepalive_timeout", lineOf(text, "keepalive_timeout")),
            ("ecdn.rules_file", lineOf(text, "rules_file")),
        ])
        self.assertTrue(all(x.source == path.path for x in e.errors))
        self.assertFalse(state.exists())

    def test_defaultPasses(self):
        self.assertEqual(preflight.load(), config.load())


class TwistdConfigErrorTests(TwistdTestsMixin, TestCase):
    """
    C{twistd -n broker --config bad.toml} as an operator runs it.
    """

    @defer.inlineCallbacks
    def test_threeMistakesOneRun(self):
        """
        Three mistakes in three sections: one run reports them all on
        stderr with key and line, exits 78 (EX_CONFIG) without twistd's
        usage text, and creates nothing: no state_dir, nothing in the
        working directory.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        state = directory.child("state")
        path = directory.child("bad.toml")
        text = (f'[broker]\nstate_dir = "{state.path}"\ndrain_timeout = -1\n\n'
                '[webpubsub]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                '[webpubsub.hubs.chat]\nplain_mode = "loud"\n\n'
                '[iot.udp]\nlisten = ["udp:1"]\n')
        path.setContent(text.encode("utf-8"))
        before = sorted(os.listdir(directory.path))
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], directory)
        yield proc.ended
        self.assertEqual(proc.exitCode(), 78, proc.text())
        stderr = proc.output[2].decode("utf-8")
        self.assertEqual(proc.output[1], b"")
        self.assertNotIn("Usage:", stderr)
        self.assertNotIn("Traceback", stderr)
        for key, fragment in [("broker.drain_timeout", "drain_timeout"),
                              ("webpubsub.hubs.chat.plain_mode", "plain_mode"),
                              ("iot.udp.listen", "listen = [\"udp")]:
            self.assertIn(f"{path.path}:{lineOf(text, fragment)}: {key}", stderr)
        self.assertIn("3 errors", stderr)
        self.assertEqual(sorted(os.listdir(directory.path)), before)
        self.assertFalse(state.exists())
