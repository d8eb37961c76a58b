# -*- test-case-name: tests.test_faceplugins -*-
"""
Faces as operator plugins.

A face is a L{twisted.plugin} provider of L{IBrokerFace}: a module-level
object in a C{twisted/plugins/} module that provides both
L{twisted.plugin.IPlugin} and L{IBrokerFace}.  The broker's own four faces
are registered that way too (C{twisted/plugins/broker_faces.py}), so an
operator's package adds a protocol by shipping its own C{twisted/plugins/}
file, exactly as the built-ins do, and nothing in C{broker} changes
(docs/plugins.md).

This module imports nothing of the broker: L{broker.config} assembles its
schema from the plugins found here, and the plugins' sections are made of
L{broker.config} primitives, so a dependency the other way would be a
cycle.
"""

import importlib
import os
import re

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogPublisher
from twisted.plugin import IPlugin, getPlugins
from twisted.python.modules import getModule
from zope.interface import Attribute, Interface, implementer

log = Logger()

# The broker's own sections: no face may take one of these names.
RESERVED = ("broker", "admin", "cluster")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class IBrokerFace(Interface):
    """
    One face of the broker: a protocol (or several) plugged into the
    routing core, configured by one section of the configuration file.
    """

    name = Attribute(
        "The face's name, which is also the name of its configuration section "
        "(C{[<name>]}): a lower-case letter, then up to 63 lower-case letters, "
        "digits or underscores; never C{broker}, C{admin} or C{cluster}.")

    description = Attribute("One line saying what the face serves, for error messages.")

    order = Attribute(
        "An integer: faces are built (and their listeners appear in the service "
        "tree) in increasing order, then by name.  The built-ins use 10 to 40; "
        "an operator's face should use 100 or more.")

    section = Attribute(
        "The L{broker.config.Table} of the face's section: its keys, defaults and "
        "checks.  Read once per configuration load, so it may be a property that "
        "imports the face's settings module lazily.")

    def build(context):
        """
        Add the face's listeners and services through C{context} (a
        L{broker.faces.FaceContext}), reading C{context.settings[name]}.
        A face whose section says it is disabled adds nothing.

        @raise broker.config.ConfigError: a value that only building can
            check (an unreadable key file); the message names the key.
        """

    def listeners(settings):
        """
        Every listener C{build} would open with C{settings} (the whole
        validated configuration), as L{ListenerSpec}s with the same keys
        C{build} gives C{context.listen} (C{<key>[n]}).  With
        C{cluster.workers} > 1 the supervisor opens exactly these and the
        workers adopt them; a listener missing here stops a worker from
        starting, naming its key.
        """


class ListenerSpec:
    """
    One listener a face opens, as a supervisor opens it for its workers.

    @ivar key: its name, as the face's C{build} names it
        (C{webpubsub.listen[0]}, C{iot.udp}).
    @ivar description: the endpoint, for logs and failures.
    @ivar endpoint: C{endpoint(reactor)}, the endpoint listening with
        C{reactor}; by default the stream endpoint parsed from
        C{description}.
    """

    def __init__(self, key, description, endpoint=None):
        self.key = key
        self.description = description
        if endpoint is None:
            endpoint = lambda reactor: serverFromString(reactor, description)  # noqa: E731
        self.endpoint = endpoint

    def __repr__(self):
        return f"<ListenerSpec {self.key} {self.description!r}>"


def streamListeners(key, descriptions):
    """
    The L{ListenerSpec}s of C{context.listen(key, descriptions, ...)}: one
    per endpoint string, named C{key[n]}.
    """
    return [ListenerSpec(f"{key}[{i}]", description)
            for i, description in enumerate(descriptions)]


@implementer(IPlugin, IBrokerFace)
class PackageFace:
    """
    A face laid out as a package: C{<package>.settings} defines C{SECTION},
    C{<package>.face} defines C{build(context)} and, for workers mode,
    C{listeners(settings)}.  The built-in faces are these; so may an
    operator's be.

    The modules are imported only when the section or the build is needed,
    so listing plugins (C{twistd --help}) stays cheap and a face whose code
    cannot be imported fails when it is configured, naming itself.
    """

    def __init__(self, name, order, description, package=None):
        self.name = name
        self.order = order
        self.description = description
        self.package = package or f"broker.{name}"

    def __repr__(self):
        return f"<face {self.name} from {self.package}>"

    def _module(self, which):
        return importlib.import_module(f"{self.package}.{which}")

    @property
    def section(self):
        return self._module("settings").SECTION

    def build(self, context):
        return self._module("face").build(context)

    def listeners(self, settings):
        listeners = getattr(self._module("face"), "listeners", None)
        return list(listeners(settings)) if listeners is not None else []


def _failedModule(failure, modules):
    """
    The name of the plugin module (of C{modules}: C{{path: name}}) that
    C{failure} was raised importing: the innermost frame in one of them,
    or the file of a C{SyntaxError}; C{None} for a failure of something
    else (Twisted failing to write its cache), which Twisted logged.
    """
    paths = [getattr(failure.value, "filename", None)]
    paths += [frame[1] for frame in reversed(failure.frames)]
    for path in paths:
        if path and os.path.abspath(path) in modules:
            return modules[os.path.abspath(path)]
    return None


class FacePluginError(Exception):
    """
    The installed face plugins cannot be used together (two of one name, a
    reserved or malformed name); C{str(error)} is the one line to print.
    """


class FacePlugins:
    """
    The face plugins found in one look-up.

    @ivar faces: the L{IBrokerFace} providers, in start-up order.
    @ivar broken: C{[(module, problem)]}, the plugin modules that could not
        be imported (their faces, if any, are missing).
    """

    def __init__(self, faces, broken=()):
        self.faces = faces
        self.broken = list(broken)

    def names(self):
        return [face.name for face in self.faces]

    def describe(self):
        """
        The installed faces and the broken plugin modules, for a message.
        """
        text = ", ".join(self.names()) or "none"
        if self.broken:
            text += "; plugin modules that failed to import: " + ", ".join(
                f"{module} ({problem})" for module, problem in self.broken)
        return text


# The broken plugin modules logged already: each once per process, however
# often the configuration is loaded.
_reported = set()


def findFaces(package=None):
    """
    The face plugins installed (C{getPlugins(IBrokerFace, twisted.plugins)}),
    checked and in start-up order.

    A plugin module that fails to import does not stop the others: Twisted
    logs its traceback (at every look-up: it does not cache a failure),
    and this logs one line naming the module (once per process), which
    L{FacePlugins.describe} repeats in configuration errors.

    @param package: the plugin package (default C{twisted.plugins}).
    @raise FacePluginError: two faces of one name, a bad name or order.
    """
    if package is None:
        import twisted.plugins as package
    failures = []

    def watch(event):
        # Twisted reports an import failure through the legacy log.err:
        # the failure is under "failure" there, "log_failure" otherwise.
        failure = event.get("log_failure", event.get("failure"))
        if failure is not None:
            failures.append(failure)
    globalLogPublisher.addObserver(watch)
    try:
        faces = list(getPlugins(IBrokerFace, package))
    finally:
        globalLogPublisher.removeObserver(watch)
    broken = []
    if failures:
        # Twisted does not say which module failed: the failure's own
        # frames (or a SyntaxError's file) do.
        modules = {os.path.abspath(m.filePath.path): m.name
                   for m in getModule(package.__name__).iterModules()}
        for failure in failures:
            module = _failedModule(failure, modules)
            if module is None:
                continue
            problem = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            broken.append((module, problem))
            if (module, problem) in _reported:
                continue
            _reported.add((module, problem))
            log.error("face plugins: {module} could not be imported ({problem}); the faces "
                      "it provides are not available", module=module, problem=problem)
    byName = {}
    for face in faces:
        name = getattr(face, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise FacePluginError(
                f"face plugin {face!r} has an unusable name {name!r}: a lower-case letter, "
                "then up to 63 lower-case letters, digits or underscores")
        if name in RESERVED:
            raise FacePluginError(f"face plugin {face!r} is named {name!r}, a section of the "
                                  f"broker itself ({', '.join(RESERVED)})")
        order = getattr(face, "order", None)
        if isinstance(order, bool) or not isinstance(order, int):
            raise FacePluginError(f"face plugin {face!r} has an unusable order {order!r}: "
                                  "an integer")
        if name in byName:
            raise FacePluginError(f"two face plugins are named {name!r}: {byName[name]!r} and "
                                  f"{face!r}; uninstall one of them")
        byName[name] = face
    faces.sort(key=lambda face: (face.order, face.name))
    return FacePlugins(faces, broken)
