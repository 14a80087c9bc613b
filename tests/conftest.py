import os, sys

# the float64 reference is a plain module beside the tests
sys.path.insert(0, os.path.dirname(__file__))


import contextlib  # noqa: E402
import io  # noqa: E402

import pytest  # noqa: E402

from cli_helpers import RUN, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """An uninterrupted `cllm train` of RUN: (its folder, its stdout). Module-scoped, so
    capsys is not at hand."""
    from cllm.cli import main
    out, stdout, stderr = tmp_path_factory.mktemp("full"), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", "-d", str(corpus), "-c", str(out), *map(str, RUN)])
    assert code == 0, (stdout.getvalue() + stderr.getvalue())[-3000:]
    return out, stdout.getvalue()
