# -*- test-case-name: tests.test_files -*-
"""
Private files: what the broker writes that holds keys, password verifiers
or messages (the stores, generated keys, event logs) is created mode 0600,
and the directories it creates for them mode 0700, whatever the umask.

Each file is created with C{os.open(..., O_CREAT, 0o600)} before anything
writes to it, so there is no moment at which it is readable by others
(SQLite gives its C{-wal}, C{-shm} and C{-journal} companions the mode of
the database file).  Directories that exist already keep their mode: they
may be the operator's (C{/var/lib}, a log directory).
"""

import os

# What SQLite creates beside a database.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def privateDirectory(path):
    """
    Create C{path} and its missing parents, each mode 0700.
    """
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        # mkdir's mode is filtered by the umask; 0700 is what is meant.
        os.chmod(directory, 0o700)


def openPrivate(path, flags=os.O_WRONLY | os.O_CREAT, narrow=True, makeDirectory=True):
    """
    Open (creating if needed) C{path} with mode 0600 and return the file
    descriptor.

    @param narrow: also narrow an existing file to 0600 (the broker's own
        files); False leaves an existing file's mode alone.
    @param makeDirectory: create the missing directories (L{privateDirectory});
        False for a path the operator chose, whose directory must exist.
    """
    if makeDirectory:
        privateDirectory(os.path.dirname(os.path.abspath(path)))
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    try:
        if narrow:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def privateFile(path):
    """
    Create C{path} empty if missing, and make it mode 0600.
    """
    os.close(openPrivate(path))


def privateDatabase(path):
    """
    Prepare an SQLite database path before SQLite opens it: the database
    file 0600 (SQLite then creates its companions with that mode) and any
    companion left by an earlier run narrowed to 0600 as well.
    """
    privateFile(path)
    for suffix in SQLITE_COMPANIONS:
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def writePrivate(path, data, exclusive=False):
    """
    Write C{data} (bytes or str) to C{path}, mode 0600.

    @param exclusive: fail with C{FileExistsError} if C{path} exists,
        rather than replacing its content.
    """
    flags = os.O_WRONLY | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = openPrivate(path, flags)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def readOperatorFile(path, error, what):
    """
    The bytes of an operator's file (a password or ACL file), or
    C{error("cannot read <what> <path>: <reason>")} raised.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}")
