"""Errors a user can cause and fix; the CLI prints `error: <message>` and exits non-zero.

Every message is self-contained: it names the file or value at fault and says what is wrong.
"""


class CllmError(Exception):
    """Base class of every error the command line reports without a traceback.

    Its text is always one line: characters that are not printable (line breaks, other
    control characters, lone surrogates), which a message may quote from a hostile file (a
    tensor name, a tokenizer's error), are shown as Python escapes."""

    def __str__(self) -> str:
        text = super().__str__()
        if text.isprintable():
            return text
        return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


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
