"""Standard descriptors 0-2 made safe to use before anything else is opened.

A program started with fd 0, 1 or 2 closed (``tucdesk exec ... >&-``) would hand that number
to the next file or socket it opens: output meant for stdout would then be written, in plain
text, into (say) a TLS connection. Opening /dev/null onto every closed one first, as OpenSSH's
sanitise_stdfd() does, makes such writes go nowhere instead.
"""

from __future__ import annotations

import errno
import os

STANDARD_FDS = (0, 1, 2)


def open_dev_null_on_closed_standard_fds() -> None:
    """Open /dev/null onto each of fds 0-2 that is closed; leave open ones alone."""
    for fd in STANDARD_FDS:
        try:
            os.fstat(fd)
        except OSError as error:
            if error.errno != errno.EBADF:
                raise
            # Not O_CLOEXEC: children we start should see the same (harmless) descriptor.
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                # A lower closed fd was filled first, so this one is free: place it exactly.
                os.dup2(opened, fd, inheritable=True)
                os.close(opened)
            else:
                os.set_inheritable(fd, True)
