"""Error reporting shared by the checkpoint commands: expected failures print one clear message (no
traceback), and SIGTERM unwinds like Ctrl-C so that temporary directories are removed."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Runs the block with SIGTERM -> KeyboardInterrupt; prints bad-input errors as `error: ...` and
    suppresses them (the command then returns 1)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
