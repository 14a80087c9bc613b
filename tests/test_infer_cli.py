"""`cllm infer`, `create`, `help` and `--version`, in-process and through the three doors."""
import io

import pytest

from cli_helpers import TINY, assert_clean_error, run_cli, run_door, write_corpus
from cllm import Model, __version__


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained a few steps, with a character tokenizer."""
    import contextlib
    from cllm.cli import main
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "-d", str(corpus), "-c", str(root / "run"), *TINY,
                     "--tokenizer", "char", "--max-steps", "3"]) == 0
    return root / "run" / "final_model.cllm"


def test_one_shot(trained, capsys):
    code, out, err = run_cli(capsys, "infer", "-m", trained, "-p", "the fox", "-n", 20,
                             "--seed", 3, "--threads", 1)
    assert code == 0, err
    model = Model.load(trained)
    expected = model.generate("the fox", max_new_tokens=20, seed=3, threads=1)
    assert out == "the fox" + expected + "\n"


def test_greedy_with_filters_and_output_file(trained, tmp_path, capsys):
    path = tmp_path / "out.txt"
    code, out, err = run_cli(capsys, "infer", "-m", trained, "-p", "a dog", "-n", 12, "-t", 0,
                             "--top-k", 5, "--top-p", 0.9, "--threads", 1, "-o", path)
    assert code == 0, err
    assert path.read_text() == out
    assert out.startswith("a dog") and len(out) == len("a dog") + 12 + 1


def test_interactive_from_a_pipe(trained, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n\nseven red\nquit\nnever read\n"))
    code, out, err = run_cli(capsys, "infer", "-m", trained, "-i", "-n", 8, "--seed", 1,
                             "--threads", 1)
    assert code == 0, err
    # 8 new characters per answer (the tokenizer has one token per character), each printed
    # on its own line
    assert len(out) == 2 * 9 and out[8] == out[17] == "\n"
    answers = [out[:8], out[9:17]]
    # the second answer continues the conversation, cut from the front to leave room for 8
    # new tokens in the context of 32 (one token per character)
    model = Model.load(trained)
    conversation = "the cat" + answers[0] + "\nseven red"
    assert len(conversation) > 24
    assert answers[1] == model.generate(conversation[-24:], max_new_tokens=8, seed=2,
                                        threads=1)


def test_long_conversation_with_transcript(trained, tmp_path, capsys, monkeypatch):
    prompt = "the lazy dog jumps over a stone wall"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\n" * 20))
    code, out, err = run_cli(capsys, "infer", "-m", trained, "-i", "-n", 10, "-p", "the",
                             "--threads", 1, "-o", tmp_path / "t.txt")
    assert code == 0 and err == ""
    transcript = (tmp_path / "t.txt").read_text()
    # printed: the prompt of -p, then each answer and a newline; the transcript adds the
    # prompts typed
    assert len(out) == 3 + 21 * 11 and len(transcript) == len(out) + 20 * len(prompt)
    assert transcript.count(prompt) >= 20


def test_interactive_bad_prompt_does_not_end_it(trained, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("ünknown characters\nthe fox\n"))
    code, out, err = run_cli(capsys, "infer", "-m", trained, "-i", "-n", 5, "--threads", 1)
    assert code == 0
    assert "lacks" in err and len(out) == 5 + 1  # the second prompt's answer


def test_create(tmp_path, capsys):
    path = tmp_path / "m.cllm"
    code, out, err = run_cli(capsys, "create", "-v", 50, "-e", 8, "-l", 2, "-H", 2, "-s", 12,
                             "--seed", 4, "-o", path)
    assert code == 0, err
    model = Model.load(path)
    assert (model.config.vocab_size, model.config.n_embd, model.config.n_layer,
            model.config.n_head, model.config.n_ctx) == (50, 8, 2, 2, 12)
    assert model.tokenizer is None and str(path) in out
    # without a tokenizer a model cannot read text
    code, _, err = run_cli(capsys, "infer", "-m", path, "-p", "hello")
    assert "has no tokenizer" in assert_clean_error(code, err, 1)


def test_create_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "create")
    assert code == 0, err
    config = Model.load(tmp_path / "model.cllm").config
    assert (config.vocab_size, config.n_embd, config.n_layer, config.n_head) == (10000, 256, 6, 8)


def test_create_with_tokenizer_takes_its_vocabulary(trained, tmp_path, capsys):
    tokenizer = trained.parent / "tokenizer.json"
    code, _, err = run_cli(capsys, "create", "-e", 8, "-l", 1, "-H", 2, "--tokenizer",
                           tokenizer, "-o", tmp_path / "m.cllm")
    assert code == 0, err
    assert Model.load(tmp_path / "m.cllm").config.vocab_size == \
        Model.load(trained).tokenizer.get_vocab_size()
    code, _, err = run_cli(capsys, "create", "-v", 7, "--tokenizer", tokenizer)
    assert "--vocab 7 contradicts" in assert_clean_error(code, err, 1)


@pytest.mark.parametrize("argv, message, status", [
    ([], "cllm: error: give a command", 2),
    (["frobnicate"], "invalid choice", 2),
    (["train"], "the following arguments are required: -d/--data", 2),
    (["infer", "-m", "x.cllm"], "give a prompt with -p/--prompt, or -i", 2),
    (["infer", "-m", "MODEL", "-p", ""], "argument -p/--prompt: must not be empty", 2),
    (["infer", "-m", "MODEL", "-p", "a", "-n", "-1"], "argument -n/--tokens", 2),
    (["infer", "-m", "MODEL", "-p", "a", "-t", "-0.5"], "argument -t/--temperature", 2),
    (["infer", "-m", "MODEL", "-p", "a", "--top-p", "0"], "argument --top-p", 2),
    (["infer", "-m", "MODEL", "-p", "a", "--top-p", "1.5"], "argument --top-p", 2),
    (["infer", "-m", "MODEL", "-p", "a", "--top-k", "0"], "argument --top-k", 2),
    (["infer", "-m", "MISSING", "-p", "a"], "no such file", 1),
    (["infer", "-m", "TRUNCATED", "-p", "a"], "truncated", 1),
    (["infer", "-m", "CORRUPT", "-p", "a"], "not a .cllm file", 1),
    (["infer", "-m", "TEXT", "-p", "a"], "not a .cllm file", 1),
    (["infer", "-m", "MODEL", "-p", "a", "-o", "FOLDER"], "the output file is a folder", 1),
    (["infer", "-m", "MODEL", "-p", "a", "-o", "NOFOLDER"], "cannot write the output file", 1),
    (["infer", "-m", "MODEL", "-p", "ÿ"], "lacks", 1),
    (["create", "-e", "10", "-H", "4"], "must be divisible by -H/--heads", 1),
    (["create", "--tokenizer", "MISSING"], "No such file or directory", 1),
    (["create", "--tokenizer", "TEXT"], "not a valid tokenizers JSON", 1),
    (["create", "-o", "NOFOLDER"], "No such file or directory", 1),
    (["help", "nothing"], "invalid choice", 2),
])
def test_bad_input(argv, message, status, trained, tmp_path, capsys):
    data = trained.read_bytes()
    (tmp_path / "truncated.cllm").write_bytes(data[:len(data) // 2])
    (tmp_path / "corrupt.cllm").write_bytes(b"\xff" * 8 + data[8:])
    (tmp_path / "text.cllm").write_text("just some text, not a model\n")
    paths = dict(MODEL=trained, MISSING=tmp_path / "missing.cllm",
                 TRUNCATED=tmp_path / "truncated.cllm", CORRUPT=tmp_path / "corrupt.cllm",
                 TEXT=tmp_path / "text.cllm", FOLDER=tmp_path,
                 NOFOLDER=tmp_path / "no" / "such" / "out.txt")
    code, _, err = run_cli(capsys, *[paths.get(a, a) for a in argv])
    assert message in assert_clean_error(code, err, status)


@pytest.mark.parametrize("argv", [["help"], ["--help"], ["help", "train"], ["train", "--help"],
                                  ["help", "infer"], ["infer", "--help"], ["help", "create"],
                                  ["create", "--help"], ["help", "--help"]])
def test_help(argv, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    assert out.startswith("usage: cllm")
    if argv[-1] == "train" or argv[0] == "train":
        for flag in ("--data", "--checkpoint-every", "--resume", "--init-from", "--spheres"):
            assert flag in out


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"cllm {__version__}\n"


@pytest.mark.parametrize("door_name", ["tools", "module"])
def test_doors(door_name, trained, tmp_path):
    result = run_door(door_name, "--version")
    assert result.returncode == 0 and result.stdout == f"cllm {__version__}\n"
    result = run_door(door_name, "infer", "-m", trained, "-i", "-n", 6, "--threads", 1,
                      "-o", tmp_path / "t",
                      input="the fox\nquit\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 7 and (tmp_path / "t").read_text() == "the fox" + result.stdout
    result = run_door(door_name, "infer", "-m", tmp_path / "t", "-p", "x")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    result = run_door(door_name, "train", "-e", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
