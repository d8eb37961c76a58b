# -*- test-case-name: tests.test_admin -*-
"""
Health notes: what a face wants the admin C{/healthz} to say beyond "ok",
without the admin knowing the face.

A face notes a problem under a key of its own (for example the Web PubSub
face: an event handler that failed validation) and clears it once fixed;
C{/healthz} lists the notes in force under its first line.
"""


class HealthNotes:
    """
    The notes in force, by key.
    """

    def __init__(self):
        self._notes = {}

    def note(self, key, text):
        """
        Set the note under C{key} (a tuple or str) to C{text}.
        """
        self._notes[key] = text

    def clear(self, key):
        self._notes.pop(key, None)

    def clearAll(self, prefix):
        """
        Clear every note whose key is a tuple starting with C{prefix}.
        """
        for key in [k for k in self._notes
                    if isinstance(k, tuple) and k[:len(prefix)] == prefix]:
            del self._notes[key]

    def notes(self):
        """
        The texts in force, sorted.
        """
        return sorted(self._notes.values())
