"""
docs/mqtt-conformance.md stays true: every MQTT 5.0 normative statement it
lists is tested (by a test that exists and cites it), listed as not
supported in docs/mqtt.md, or a client's duty; its summary counts agree.
"""

import ast
import importlib
import inspect
import re

from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

DOCS = FilePath(__file__).parent().parent().child("docs")
ROW = re.compile(r"^\| MQTT-(\d+\.\d+\.\d+-\d+) \| (S|S/C|C) \| (.+) \| (.+) \|$")
ID = re.compile(r"MQTT-(\d+\.\d+\.\d+-\d+)")
# The modules written for the list: their tests cite the statements they cover.
CITING = ("tests.test_mqtt_conformance", "tests.test_mqtt_conformance_publish",
          "tests.test_mqtt_conformance_flows")


def rows():
    """C{[(id, who, status)]} of docs/mqtt-conformance.md's tables."""
    text = DOCS.child("mqtt-conformance.md").getContent().decode("utf-8")
    return [(m.group(1), m.group(2), m.group(4).strip())
            for m in map(ROW.match, text.splitlines()) if m]


def testNames(status):
    return [name.strip() for name in status[len("test:"):].split(",")]


def resolve(name):
    """The test method a dotted name designates, or C{None}."""
    module, cls, method = name.rsplit(".", 2)
    try:
        found = getattr(getattr(importlib.import_module(module), cls), method)
    except (ImportError, AttributeError):
        return None
    return found if method.startswith("test_") and callable(found) else None


def citations():
    """C{{statement id: [dotted test names]}} from the citing modules' docstrings."""
    cited = {}
    for moduleName in CITING:
        tree = ast.parse(inspect.getsource(importlib.import_module(moduleName)))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                for i in ID.findall(ast.get_docstring(fn) or ""):
                    cited.setdefault(i, []).append(f"{moduleName}.{cls.name}.{fn.name}")
    return cited


class ConformanceListTests(TestCase):

    def setUp(self):
        self.rows = rows()

    def test_everyRowFilled(self):
        """No row is C{?}; each status is one of the three kinds; ids are unique."""
        self.assertGreater(len(self.rows), 250)
        ids = [i for i, who, status in self.rows]
        self.assertEqual(len(ids), len(set(ids)))
        for i, who, status in self.rows:
            self.assertNotEqual(status, "?", i)
            if status == "n/a":
                self.assertEqual(who, "C", f"{i}: n/a without a reason on a server row")
            else:
                self.assertTrue(status.startswith(("test: ", "not supported: ", "n/a: ")),
                                f"{i}: {status}")

    def test_testsExist(self):
        """Every C{test:} reference names a test method that exists."""
        for i, who, status in self.rows:
            if status.startswith("test:"):
                for name in testNames(status):
                    self.assertIsNotNone(resolve(name), f"{i}: no test {name}")

    def test_notSupportedListed(self):
        """Every C{not supported} statement is named in mqtt.md's section of them."""
        guide = DOCS.child("mqtt.md").getContent().decode("utf-8")
        section = guide.split("## Not supported, and why", 1)[1].split("\n## ", 1)[0]
        for i, who, status in self.rows:
            if status.startswith("not supported"):
                self.assertIn(f"MQTT-{i}", section, f"{i} missing from docs/mqtt.md")

    def test_citationsListed(self):
        """
        A statement a conformance test cites is a row of the list, and that
        row names the test.
        """
        statuses = {i: status for i, who, status in self.rows}
        for i, names in citations().items():
            self.assertIn(i, statuses, f"MQTT-{i} cited but not listed")
            for name in names:
                self.assertIn(name, testNames(statuses[i]), f"MQTT-{i}: {name} not listed")

    def test_summary(self):
        """The summary line counts the rows as they are."""
        text = DOCS.child("mqtt-conformance.md").getContent().decode("utf-8")
        kinds = [status.split(":")[0] for i, who, status in self.rows]
        expected = (f"**Summary: {len(kinds)} statements: {kinds.count('test')} tested, "
                    f"{kinds.count('not supported')} not supported, "
                    f"{kinds.count('n/a')} n/a.**")
        self.assertIn(expected, text)
