"""
What data/hf.py and data/tokenize.py share, so that they fail as carefully as ./fpdt does:

- run(): the one top-level handler. Any failure (a Failure raised by fail(), an OSError, a
  MemoryError, anything unexpected) becomes one line `NAME: ...` on stderr and exit 1, after the
  temporaries of this run are removed; a traceback only with --debug.
- open_input(): inputs are opened only if they are regular files: stat first, then open with
  O_NONBLOCK (a FIFO swapped in between cannot block), then fstat. A FIFO, a device or a
  directory in an input's place is one line, never a hang.
- new_temp_file() / new_temp_dir() / commit(): outputs are written into a temporary, created new
  (O_EXCL, never through a symbolic link) and renamed into place only when complete. Until then
  the temporary is listed, and run() removes it on every failure path.
"""
import os
import stat
import sys
import traceback


class Failure(Exception):
    """A problem told in one line (the message); the tool exits 1."""


def fail(msg):
    raise Failure(msg)


def kind(mode):
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


def check_regular(path, follow=True):
    """The size of path, a regular file (following a link unless follow is False); fails otherwise."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        fail("%s: no such file" % path)
    except OSError as e:
        fail("%s: %s" % (path, e.strerror))
    if not stat.S_ISREG(st.st_mode):
        fail("%s: not a regular file (%s)" % (path, kind(st.st_mode)))
    return st.st_size


def open_input(path, mode="rb", follow=True, max_bytes=None, **kw):
    """path opened for reading, only if it is a regular file (of at most max_bytes)."""
    size = check_regular(path, follow)
    if max_bytes is not None and size > max_bytes:
        fail("%s: %d bytes, too large for what it should hold (at most %d)" % (path, size, max_bytes))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        fail("%s: cannot open (%s)" % (path, e.strerror))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        fail("%s: not a regular file (%s)" % (path, kind(st.st_mode)))
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **kw)


def machine_memory():
    """Bytes of memory this machine has (a large number where it cannot tell)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_memory(what, nbytes):
    """Fails, naming both sizes, when nbytes for `what` are more than this machine has."""
    have = machine_memory()
    if nbytes > have:
        fail("%s needs %.1f GiB of memory, more than this machine has (%.1f GiB)" % (what, nbytes / 2 ** 30, have / 2 ** 30))


# ----------------------------------------------------------------------------
# Outputs through temporaries

_temps = []  # [(path, names a directory may hold)]: created by this run, not yet renamed into place


def _remove_temp(path, own):
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        for n in os.listdir(path):
            p = os.path.join(path, n)
            if n in own and stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
        os.rmdir(path)
    elif stat.S_ISREG(st.st_mode):
        os.unlink(path)


def _clear_stale(path, own=None):
    """A leftover of an earlier failed run at a temporary's name is removed when it is what the
    tool makes there (a regular file, or a directory of the files `own` names); anything else
    (a symbolic link, a FIFO, foreign files) is refused and left as it is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    want_dir = own is not None
    if want_dir != stat.S_ISDIR(st.st_mode) or (not want_dir and not stat.S_ISREG(st.st_mode)):
        fail("%s: %s where this tool writes its temporary; it is not removed: move it away" % (path, kind(st.st_mode)))
    if want_dir:
        for n in os.listdir(path):
            if n not in own or not stat.S_ISREG(os.lstat(os.path.join(path, n)).st_mode):
                fail("%s holds %s, which this tool did not write; it is not removed: move it away" % (path, n))
    _remove_temp(path, own or ())


def create_new(path):
    """A new regular file at path, opened for writing (O_EXCL: never an existing file or link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        fail("cannot write %s: %s" % (path, e.strerror))
    return os.fdopen(fd, "wb")


class Output:
    """A new file at path (create_new), written and closed (flushed, fsynced) with any failure,
    a full disk included, told in one line naming it."""

    def __init__(self, path):
        self.path, self.f = path, create_new(path)

    def _do(self, fn, *a):
        try:
            return fn(*a)
        except OSError as e:
            fail("cannot write %s: %s" % (self.path, e.strerror))

    def write(self, b):
        self._do(self.f.write, b)

    def seek(self, pos):
        self._do(self.f.seek, pos)

    def close(self):
        self._do(self.f.flush)
        self._do(os.fsync, self.f.fileno())
        self._do(self.f.close)


def make_dir(path):
    """path and its parents, created where missing (following a link the user gave)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        fail("%s: not a directory" % path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail("cannot create %s: %s" % (e.filename or path, e.strerror))


def new_temp_file(path):
    """The temporary file path, created new and listed for removal on failure: an Output."""
    _clear_stale(path)
    f = Output(path)
    _temps.append((path, ()))
    return f


def new_temp_dir(path, own):
    """The temporary directory path (to hold the files `own` names), created new and listed."""
    _clear_stale(path, own)
    try:
        os.mkdir(path)
    except OSError as e:
        fail("cannot create %s: %s" % (path, e.strerror))
    _temps.append((path, tuple(own)))


def check_replaceable(path):
    """Fails unless path is absent or a regular file, the only thing a commit replaces."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        fail("%s: %s is there; only a regular file is replaced" % (path, kind(st.st_mode)))


def commit(tmp, final):
    """Renames the complete temporary into place; it is then no longer removed on failure."""
    try:
        os.replace(tmp, final)
    except OSError as e:
        fail("cannot rename %s to %s: %s" % (tmp, final, e.strerror))
    for i, (p, _) in enumerate(_temps):
        if p == tmp:
            del _temps[i]
            break


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# The top-level handler

def describe(e):
    """One line for any exception."""
    if isinstance(e, Failure):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, MemoryError):
        return "out of memory (this machine has %.1f GiB)" % (machine_memory() / 2 ** 30)
    if isinstance(e, OSError):
        return "%s: %s" % (e.filename, e.strerror) if e.filename else (e.strerror or str(e))
    # a bug, or a library's own exception: still one line
    return "%s: %s (rerun with --debug for the traceback)" % (type(e).__name__, str(e).strip() or "no message")


def run(name, main):
    """main(argv) with --debug taken out; exits with its status, or 1 and one line for any failure."""
    debug = "--debug" in sys.argv[1:]
    argv = [a for a in sys.argv if a != "--debug"]
    try:
        sys.exit(main(argv) or 0)
    except SystemExit:
        raise
    except BaseException as e:
        msg = describe(e)
        if debug:
            traceback.print_exc()
    for path, own in reversed(_temps):
        try:
            _remove_temp(path, own)
        except OSError:
            pass
    sys.stderr.write("%s: %s\n" % (name, " ".join(msg.split())))
    sys.exit(1)
