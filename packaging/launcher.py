# fluxrt.pyz's __main__: choose where shiv unpacks the bundled packages, then hand over to shiv's bootstrap.
# shiv unpacks into $SHIV_ROOT, else ~/.shiv, and fails outright when that cannot be created (a read-only or
# missing home under systemd's ProtectHome, a locked-down service account). Here ~/.shiv is used only when it is
# writable; otherwise a private folder in the temporary directory.
import os
import signal
import stat
import sys

# A reload request during the first start (seconds of unpacking and compiling) must not kill the process; fluxrt
# takes SIGHUP over once it serves.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

SUPPORTED = ()
"""(major, minor) versions whose extension modules the pyz holds; filled in by build_pyz.py"""


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _private_temp():
    import tempfile  # only here: it costs a noticeable part of a warm start

    path = os.path.join(tempfile.gettempdir(), f"fluxrt-shiv-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        sys.exit(f"fluxrt: cannot unpack: {path}: {exc.strerror}; set SHIV_ROOT to a writable directory")
    # Someone else's folder (or a symlink) in a shared /tmp could hand us code to run: refuse it.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        sys.exit(f"fluxrt: refusing to unpack into {path}: not a private directory of this user; set SHIV_ROOT")
    return path


if SUPPORTED and sys.version_info[:2] not in SUPPORTED:
    _built_for = ", ".join(f"{major}.{minor}" for major, minor in SUPPORTED)
    sys.exit(
        f"fluxrt: this fluxrt.pyz runs on Python {_built_for}, not on {sys.version_info[0]}.{sys.version_info[1]} "
        f"({sys.executable}): run it with one of those, or build one for this Python (packaging/INSTALL.md)"
    )

if not os.environ.get("SHIV_ROOT") and not _writable(os.path.expanduser("~/.shiv")):
    os.environ["SHIV_ROOT"] = _private_temp()

import _bootstrap  # noqa: E402

_bootstrap.bootstrap()
