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

    def notes(self):
        """
        The texts in force, sorted.
        """
        return sorted(self._notes.values())
