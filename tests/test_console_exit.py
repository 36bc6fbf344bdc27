"""erofs-tools run as a program ends without the interpreter's teardown
(errors.exit_now): its output and atexit functions are not lost on the way; called
in-process with arguments it still raises SystemExit."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('ATEXIT\\n'))\n"
    "from erofs_tools.cli import main\n"
    "sys.argv[0] = 'erofs-tools'\n"
    "main()\n"
    "sys.stderr.write('NOT REACHED\\n')\n")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True,
                          env=env)


def test_pack_as_a_program_flushes_its_output_and_runs_atexit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(b"%d " % i * (100 + i))
    out = tmp_path / "out"
    out.mkdir()
    r = _run("pack", str(src), "-B", str(out / "boot"), "-D", str(out), "--json")
    assert r.returncode == 0, r.stderr
    # stdout a pipe: block-buffered, so only the explicit flush brings the JSON out
    assert json.loads(r.stdout)["chunks_total"] == 50
    assert r.stderr.decode().splitlines() == ["ATEXIT"]


def test_an_error_still_exits_1_with_its_one_line(tmp_path):
    r = _run("pack", str(tmp_path / "missing"), "-B", str(tmp_path / "b"), "-D",
             str(tmp_path))
    assert r.returncode == 1
    lines = r.stderr.decode().splitlines()
    assert lines[0].startswith("error: ") and lines[1:] == ["ATEXIT"]


def test_main_with_arguments_raises_systemexit_in_process(capsys):
    from erofs_tools.cli import main
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert "erofs-tools" in capsys.readouterr().out


def test_a_path_with_control_characters_stays_in_one_line_messages(tmp_path):
    """A name may hold a newline (a source tree's, a tar's, an image's): the error that
    names it is still one line (errors.shown_path escapes control characters; the
    console joins whatever lines a message still has)."""
    from erofs_tools.errors import shown_path
    assert shown_path(b"/d/a\nb\x1b[31m") == "/d/a\\x0ab\\x1b[31m"
    assert shown_path("x" * 400).startswith("...") and len(shown_path("x" * 400)) == 303
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", str(tmp_path / "o.img"),
                        str(tmp_path / "no\nsuch")], capture_output=True, env=env)
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not os.path.exists(tmp_path / "o.img")
