# -*- test-case-name: tests.test_admin_api -*-
"""
What a face lends the admin face: its section of C{/stats} and of the
console's overview, its counters for the rate charts, and its own part of
the admin API under C{/api/<name>/}.

A face builds its view over its own objects (the IoT concentrator, the
peer-groups service, the eCDN resource) and registers it with
L{broker.faces.FaceContext.addAdminView}; the admin package imports no
face.
"""

from zope.interface import Attribute, Interface


class IFaceView(Interface):
    name = Attribute("The face's name: its /stats section and its /api/<name>/ prefix.")

    def summary():
        """
        @return: a JSON-ready dict of the face's totals, computed at once
            from in-memory state (read on every C{/stats} and console
            poll: no I/O, no walk over every connection).
        """

    def counters():
        """
        @return: C{{name: int}} of monotonically increasing counters the
            rate sampler (L{broker.admin.rates.RateSampler}) turns into
            per-second rates for the console's charts.
        """

    def read(path, args):
        """
        Answer C{GET /api/<name>/<path>}.

        @param path: the path segments after the face's name (a list of
            str, possibly empty).
        @param args: the query, C{{name: str}} (the first value of each).
        @return: a JSON-ready value or a Deferred of one.
        @raise broker.admin.api.APIError: 404 for an unknown path or
            object, 400 for a bad argument.
        """

    def act(method, path, args):
        """
        Carry out C{POST} or C{DELETE /api/<name>/<path>} (an action; the
        admin token has been checked).

        @return: as L{read}.
        """
