"""The CLI argument surface under random input: one clear line and exit code 2, never a traceback.

Random argument lists (flags of each command, random values, paths that exist but hold the wrong thing,
invalid UTF-8 as argv carries it) go through `flows.cli.main` in-process. Anything but a clean exit is a bug:
argparse's own usage errors (SystemExit 2) and our one-line user errors (return 2) are the only ways out.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main

# commands that only read (or fail before writing): demo-corpus, extract, pipeline and server would start
# real work on a valid-looking input, so they are covered by their own tests instead
COMMANDS = {
    "catalog": ["--previous", "--json", "--probe-timeout"],
    "annotations": ["--format", "--skip-malformed", "--strict", "--json"],
    "train": ["--preset", "--store", "--annotations", "--out", "--set", "--format", "--no-resume", "--json"],
    "evaluate": ["--model", "--split", "--captions", "--gallery", "--store", "--json"],
    "index": ["--model", "--catalog", "--annotations", "--split", "--store", "--fp32", "--json"],
    "search": ["--model", "--index", "--top-k", "--kernel", "--json"],
}


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> list[str]:
    """Paths a careless user might pass: missing, a folder, a binary file, a text file, an empty file."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    (root / "folder").mkdir()
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "text.txt").write_text("video_id,start,end,caption\nv1,0,1,a cat\n")
    (root / "empty.json").write_text("")
    (root / "deep.json").write_text("[" * 5000 + "]" * 5000)
    return [str(root / n) for n in ("missing", "folder", "binary.bin", "text.txt", "empty.json", "deep.json")]


def _values(places: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(places),
        st.sampled_from(
            ["demo", "tvr", "n_epoch=0", "lr=inf", "batch_size=1e30", "-1", "0", "99999999999999"]
        ),
        st.text(max_size=30),
        st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_arguments_never_raise(places, capsys, data):
    command = data.draw(st.sampled_from(sorted(COMMANDS)))
    flags = COMMANDS[command]
    argv = [command, places[1]] if command == "catalog" else [command]  # never scan a random folder
    for _ in range(data.draw(st.integers(0, 6))):
        argv.append(data.draw(st.one_of(st.sampled_from(flags), _values(places))))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors
        assert exc.code in (0, 2), argv
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), argv
    assert "Traceback" not in err, (argv, err)
    if code == 2 and err and not err.startswith("usage:"):
        assert len(err.strip().splitlines()) <= 3, (argv, err)  # the error line (+ argparse usage lines)
