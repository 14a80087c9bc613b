"""Errors a user can cause and fix; the CLI prints `error: <message>` and exits non-zero.

Every message is self-contained: it names the file or value at fault and says what is wrong.
"""


class CllmError(Exception):
    """Base class of every error the command line reports without a traceback."""


class DataError(CllmError):
    """A corpus, tokenizer, prompt or dataset file that cannot be used."""


class CheckpointError(CllmError):
    """A .cllm file that cannot be read, or does not match its own configuration."""
