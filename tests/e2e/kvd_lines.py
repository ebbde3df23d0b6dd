"""kvd_lines.py - what the two daemon harnesses share: a child process's output lines,
collected on a reader thread, and the child's lifetime.

The base of the end-to-end harness's Daemon (kvd_e2e.py) and of the soak harness's
(tests/soak/soaklib.py): both wait for banner lines, show the output on failure, look
for sanitizer reports and never let a daemon outlive its test.
"""
import ctypes
import re
import signal
import threading
import time

# Lines a sanitizer build of kvd prints when it finds something.
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "SUMMARY: UndefinedBehaviorSanitizer", "SUMMARY: AddressSanitizer")


def die_with_parent():
    """Runs in the child before exec (Popen's preexec_fn): the kernel kills the daemon
    when the test process dies, even by SIGKILL (a test runner's timeout), so no daemon
    outlives its test."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LineLog:
    """Mixin: self.proc's stdout lines in self.lines; wait_for_line() blocks on them."""

    line_failure = AssertionError  # exception raised when a line never comes

    def __init__(self):
        self.lines = []
        self._cond = threading.Condition()
        self._eof = False

    def follow_output(self):
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_line(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        with self._cond:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                if self._eof:
                    raise self.line_failure("kvd exited (status %s) before printing %r; output:\n%s" %
                                            (self.proc.poll(), pattern, "\n".join(self.lines)))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.line_failure("kvd printed no %r within %s s; output:\n%s" %
                                            (pattern, timeout, "\n".join(self.lines)))
                self._cond.wait(min(left, 0.2))

    def wait_eof(self, timeout):
        """Waits until the reader has every line the child wrote (its output closed);
        True when it has. A child that has exited may still have lines in the pipe
        that the reader thread has not taken yet."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def output(self):
        with self._cond:
            return "\n".join(self.lines)

    def sanitizer_report(self):
        """The whole output if it holds a sanitizer report, else None."""
        out = self.output()
        return out if any(marker in out for marker in SANITIZER_MARKERS) else None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output_tail(self, n=40):
        with self._cond:
            return "\n".join(self.lines[-n:])
