"""Errors a user can cause and fix; the CLI prints `error: <message>` and exits non-zero.

Every message is self-contained: it names the file or value at fault and says what is wrong.
"""


class CllmError(Exception):
    """Base class of every error the command line reports without a traceback."""


class DataError(CllmError):
    """A corpus, tokenizer, prompt or dataset file that cannot be used."""


class CheckpointError(CllmError):
    """A .cllm file that cannot be read, or does not match its own configuration."""


class UnverifiedFile(UserWarning):
    """A file loaded without an integrity check: one written before files carried digests."""


class NonFiniteError(CllmError):
    """A loss, gradient norm or parameter that is NaN or infinite: training stops before the
    optimizer or a file sees it."""


class Stopped(Exception):
    """A run stopped by a signal (SIGINT, SIGTERM, SIGHUP) after saving what it had done; the
    command exits with 128 + signum, as a process killed by that signal would."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
