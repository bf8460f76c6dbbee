"""Fuzzing the command line: whatever the arguments and files, ``spdsl`` ends with exit status 0, 1 or 2
and a short report -- never a Python traceback, never "internal error".

Argument vectors are drawn over every subcommand (``check``, ``show``, ``analyze``, ``build``), no
subcommand, ``--version``, ``--help`` and unknown commands, mixing valid and hostile values for every
option (``-D``, ``--seq``, ``--block``, ``--width``, ``--kv-heads``, ``--head-dim``, ``--dtype-bytes``,
``--pattern``, ``--png``, ``-o``), over shipped patterns, mutated copies of them (characters and tokens
deleted, inserted, duplicated, replaced), random bytes, empty and binary files, folders and missing
paths. Each vector runs in-process through :func:`spdsl.cli.main`, inside a scratch folder (the
working directory, so ``-o .`` and relative ``--png`` land there) with low resource limits so that
every example is fast. ``build --check`` is left out (the Triton interpreter takes seconds; the
README's command runs in tests/test_dependencies.py), and so is ``--debug`` (it shows tracebacks
on purpose).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spdsl
from spdsl import cli
from tests.helpers import scoped_env
from tests.strategies import n_examples

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "patterns").glob("*.spd"))
TEXTS = [p.read_text(encoding="utf-8") for p in SHIPPED]
PARAMS = sorted({name for p in SHIPPED for name in spdsl.load(p).params})
PATTERN_NAMES = sorted({spdsl.load(p).name for p in SHIPPED})

#: Low enough that any example is refused or done in well under a second.
LOW_LIMITS = {"tiles": 40_000, "dense": 1_000_000, "reach_nodes": 1024, "reach_words": 20_000_000}

# ---------------------------------------------------------------------------------------- files
#: Fixed inputs, created once in the scratch folder (``name: content``; None: a folder).
FIXED_FILES: dict[str, bytes | None] = {
    "empty.spd": b"",
    "binary.spd": bytes(range(256)) * 4,
    "nul.spd": b"pattern p() {\x00 attend all }\n",
    "latin1.spd": "pattern caf\u00e9() { attend all }\n".encode("latin-1"),
    "bom.spd": b"\xef\xbb\xbf" + TEXTS[0].encode(),
    "two.spd": b"pattern a(w = 2) { attend local(w) }\npattern b(s = 1) { causal attend sink(s) | local(4) }\n",
    "caf\u00e9 \u2603.spd": TEXTS[0].encode(),
    "folder": None,
    "dir.spd": None,
}
#: A folder holding .spd files, one of them broken (``check``/``analyze`` accept folders).
SPD_FOLDER = "spd_folder"
#: Rewritten by every example: a mutated shipped pattern and random bytes.
MUTATED, RANDOM = "mutated.spd", "random.spd"

FILE_ARGS = st.one_of(
    st.sampled_from([str(p) for p in SHIPPED]),
    st.just(MUTATED),
    st.sampled_from([*FIXED_FILES, SPD_FOLDER, MUTATED, RANDOM]),
    st.sampled_from(["missing.spd", "", ".", "-", "folder/missing.spd", "empty.spd/x.spd", "/dev/null", "/proc/x"]),
)

# Tokens of a .spd text: names, integers, `//`, single characters and runs of spaces.
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|//|\s+|.", re.DOTALL)
VOCABULARY = [
    *("pattern", "unit", "causal", "attend", "all", "sink", "local", "powers", "stride", "dilated"),
    *("segment", "every", "band", "locl", "window", "sinks", "w", "r", "x"),
    *("0", "1", "-1", "2", "256", "2147483647", "2147483648", "99999999999999999999", "1e9", "0x10"),
    *("(", ")", "{", "}", ",", "=", ";", "|", "&", "-", "+", "*", "//", "%", "#", "\n", " ", "\t", "\r"),
    *("\u00e9", "\u2603", "\u0661", "\x00", "\ufeff", "\u202e", "\ud800"),
]
MUTATION_CHARS = st.one_of(st.sampled_from(sorted({c for t in TEXTS for c in t})), st.characters())


@st.composite
def mutated_texts(draw) -> str:
    """A shipped pattern with 1-8 character or token edits: delete, insert, duplicate, replace, cut."""
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(1, 8))):
        tokens = _TOKEN.findall(text) or [""]
        i = draw(st.integers(0, len(tokens) - 1))
        op = draw(st.sampled_from(["delete", "insert", "duplicate", "replace", "char", "cut"]))
        if op == "delete":
            del tokens[i]
        elif op == "insert":
            tokens.insert(i, draw(st.sampled_from(VOCABULARY)))
        elif op == "duplicate":
            tokens.insert(i, tokens[i])
        elif op == "replace":
            tokens[i] = draw(st.sampled_from(VOCABULARY))
        elif op == "char":
            pos = draw(st.integers(0, len(text)))
            tokens = [text[:pos], draw(MUTATION_CHARS), text[pos + draw(st.integers(0, 1)) :]]
        else:
            tokens = tokens[:i]
        text = "".join(tokens)
    return text


# --------------------------------------------------------------------------------------- values
HOSTILE_INTS = [
    *("0", "-1", "1", "2147483647", "2147483648", "9223372036854775807", "9223372036854775808"),
    *("99999999999999999999", "-99999999999999999999", "abc", "", " ", "1e3", "3.5", "0x10", "+5", "1_000"),
    *("\u0661\u0662", "nan", "-0", "--seq"),
]


def _ints(*usual: int) -> st.SearchStrategy[str]:
    """Integer option values: mostly usual ones (so that commands get past the parser), else hostile:
    boundaries, huge, negative, and not integers at all."""
    return st.one_of(
        st.sampled_from([str(v) for v in usual]),
        st.sampled_from([str(v) for v in usual]),
        st.sampled_from(HOSTILE_INTS),
        st.integers(-(2**70), 2**70).map(str),
    )


SEQS = _ints(1, 7, 100, 128, 1000, 4096, 8192, 32768, 131072, 1048576, 4194304)
BLOCKS = _ints(1, 16, 64, 128, 256, 1024, 65536)
DEFINES = st.one_of(
    st.tuples(st.sampled_from(PARAMS), st.integers(-3, 40)).map(lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(PARAMS), st.integers(-3, 40)).map(lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(PARAMS), st.integers(-(2**40), 2**40)).map(lambda t: f"{t[0]}={t[1]}"),
    st.sampled_from(
        [
            *("window=8", "w=", "=3", "x=1e9", "window=99999999999999999999", "window=0", "window=-1", "sinks=0"),
            *("window=2147483647", "window=-2147483648", "window=2147483648", "window=\u0661", "w\u00edndow=3"),
            *("window=3=4", "window", "", " ", "window=+5", "window=1_0", "window=_1", "1x=2", "sinks=2"),
            *("ratio=0", "step=-3", "w=3", "r=2", "w=0", "window= 12 ", "window=1\n", "\u0000=1"),
        ]
    ),
    st.text(max_size=12),
)
PATTERN_ARGS = st.one_of(
    st.sampled_from([*PATTERN_NAMES, "a", "b", "nope", "", "caf\u00e9", "1x"]), st.text(max_size=6)
)
PNGS = st.sampled_from(
    [
        *("fig.png", "fig", "fig.svg", "fig.PNG", "fig.xyz", "fig.", ".png", "folder", "", "."),
        *("missing/fig.png", "empty.spd/fig.png", "/proc/x.png", "/proc/x/fig.png", "caf\u00e9.png"),
    ]
)
OUTS = st.sampled_from(
    ["out", "out/a/b", ".", "", "folder", "empty.spd", "empty.spd/sub", "/proc/x", "/proc/self", "/dev/null", "\u00f6"]
)
FLAGS = ["--json", "--markdown", "--ascii", "--help", "-h", "--version", "--frobnicate", "-Z", "--"]
OPTIONS = {  # subcommand: option -> strategy for its value
    "check": {"-D": DEFINES, "--define": DEFINES, "--pattern": PATTERN_ARGS, "-p": PATTERN_ARGS},
    "show": {
        "-D": DEFINES,
        "--pattern": PATTERN_ARGS,
        "--seq": SEQS,
        "-n": SEQS,
        "--block": BLOCKS,
        "--width": _ints(1, 8, 40, 80, 400, 5000),
        "--png": PNGS,
    },
    "analyze": {
        "-D": DEFINES,
        "--pattern": PATTERN_ARGS,
        "--seq": SEQS,
        "--block": BLOCKS,
        "--kv-heads": _ints(1, 8, 32),
        "--head-dim": _ints(1, 64, 128),
        "--dtype-bytes": _ints(1, 2, 4),
        "--png": PNGS,
    },
    "build": {"-D": DEFINES, "--pattern": PATTERN_ARGS, "-o": OUTS, "--out": OUTS},
}
#: How many files each subcommand is given (show and build take exactly one).
N_FILES = {
    "check": [1, 1, 1, 2, 3, 0],
    "show": [1] * 6 + [0, 2],
    "analyze": [1, 1, 1, 2, 3, 0],
    "build": [1] * 6 + [0, 2],
}


@st.composite
def argvs(draw) -> list[str]:
    """A command line: mostly a subcommand with files, options and flags in any order."""
    kind = draw(st.sampled_from(["sub"] * 12 + ["top", "noise"]))
    if kind == "top":
        return draw(
            st.sampled_from(
                [[], ["--version"], ["-V"], ["--help"], ["-h"], ["frob"], ["--version", "check"], ["help"], ["--"]]
            )
        )
    if kind == "noise":
        return draw(st.lists(st.one_of(st.sampled_from([*OPTIONS, *FLAGS, "-D", "--seq"]), st.text(max_size=8))))
    cmd = draw(st.sampled_from(sorted(OPTIONS)))
    pieces = [[draw(FILE_ARGS)] for _ in range(draw(st.sampled_from(N_FILES[cmd])))]
    for opt in draw(st.lists(st.sampled_from(sorted(OPTIONS[cmd])), max_size=4)):
        pieces.append([opt, draw(OPTIONS[cmd][opt])])
    if draw(st.integers(0, 9)) == 0:
        pieces.append([draw(st.sampled_from(FLAGS))])
    if cmd == "analyze" and draw(st.booleans()):
        pieces.append([draw(st.sampled_from(["--json", "--markdown"]))])
    if cmd == "show" and draw(st.booleans()):
        pieces.append(["--ascii"])
    order = draw(st.permutations(range(len(pieces)))) if pieces else []
    argv = [cmd, *(token for i in order for token in pieces[i])]
    if draw(st.integers(0, 14)) == 0 and len(argv) > 1:  # an option left without its value, or a stray token
        argv = argv[:-1] if draw(st.booleans()) else [*argv, draw(st.text(max_size=6))]
    assert "--check" not in argv and "--debug" not in argv
    return argv


# -------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The working folder of every example, with the fixed files in it."""
    root = tmp_path_factory.mktemp("cli_fuzz")
    for name, content in FIXED_FILES.items():
        if content is None:
            (root / name).mkdir()
        else:
            (root / name).write_bytes(content)
    (root / SPD_FOLDER).mkdir()
    (root / SPD_FOLDER / "power.spd").write_text(TEXTS[0])
    (root / SPD_FOLDER / "broken.spd").write_text("pattern p(w = 3) {\n    attend locl(w)\n}\n")
    return root


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(argv: list[str], folder: Path) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``spdsl.cli.main(argv)`` run in ``folder`` with low limits."""
    out, err = io.StringIO(), io.StringIO()
    env = scoped_env(SPDSL_CACHE_DIR=str(folder / "cache"), SPDSL_DEBUG=None, TRITON_INTERPRET=None)
    redirect = contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)
    with env, spdsl.limits.override(**LOW_LIMITS), _cwd(folder), redirect[0], redirect[1]:
        try:
            cli.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def check_argv(argv: list[str], folder: Path) -> None:
    code, out, err = run_cli(argv, folder)
    shown = f"argv={argv!r}\nexit {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert code in (0, 1, 2), shown
    for stream in (out, err):
        assert "Traceback" not in stream, shown
        assert "internal error" not in stream, shown
    if code == 1:  # a user error: a report on stderr ('error:' lines, or check's 'N failed')
        assert "error" in err or "failed" in err, shown
    elif code == 2:  # a usage error from the parser (or help, for no arguments at all)
        assert err.strip() or out.strip(), shown


def _example(folder: Path, text: str, noise: bytes, argv: list[str]) -> None:
    (folder / MUTATED).write_text(text, encoding="utf-8", errors="surrogatepass")
    (folder / RANDOM).write_bytes(noise)
    check_argv(argv, folder)


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=n_examples(250))
@given(text=mutated_texts(), noise=st.binary(max_size=200), argv=argvs())
def test_random_command_lines_exit_0_1_or_2_without_traceback(scratch, text, noise, argv):
    _example(scratch, text, noise, argv)


@pytest.mark.slow
@settings(FUZZ, max_examples=n_examples(5000))
@given(text=mutated_texts(), noise=st.binary(max_size=200), argv=argvs())
def test_random_command_lines_exit_0_1_or_2_without_traceback_thorough(scratch, text, noise, argv):
    _example(scratch, text, noise, argv)


# ------------------------------------------------------------------------------ fixed regressions
POWER = str(ROOT / "patterns" / "power.spd")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["show", POWER, "--block", "99999999999999999999"], 2, "--block"),  # was an OverflowError
        (["show", POWER, "--seq", "2147483648"], 2, "--seq"),
        (["analyze", POWER, "--seq", "9223372036854775808"], 2, "--seq"),
        (["check", POWER, "-D", "window=\u0661"], 1, "is not an integer"),  # a non-ASCII digit
        (["show", POWER, "--png", "folder"], 1, "is a folder"),  # matplotlib wrote folder.png
        (["show", POWER, "--png", ""], 1, "is a folder"),  # ... and '' wrote .png
        (["analyze", POWER, "--png", "fig.xyz"], 1, "does not write '.xyz' files"),
        (["build", POWER, "-o", "empty.spd"], 1, "empty.spd is a file, not a folder"),
        (["build", POWER, "-o", "/proc/x"], 1, "cannot write /proc/x/power.py"),
        (["frob"], 2, "No such command"),
    ],
)
def test_hostile_arguments_get_a_clear_report(scratch, argv, code, message):
    got, out, err = run_cli(argv, scratch)
    assert got == code, (out, err)
    assert message in " ".join(err.split()), err
    assert "Traceback" not in out + err and "internal error" not in out + err


def test_png_without_a_suffix_is_written_at_exactly_that_path(scratch):
    code, out, err = run_cli(["show", POWER, "--seq", "4096", "--png", "figure_without_suffix"], scratch)
    assert code == 0, err
    assert "wrote figure_without_suffix" in out
    assert (scratch / "figure_without_suffix").read_bytes().startswith(b"\x89PNG")
    assert not (scratch / "figure_without_suffix.png").exists()


def test_analyze_a_unit_1_pattern_at_2_to_the_31_tokens_in_huge_tiles_is_quick(scratch):
    """Density and decode keys were counted with O(seq) tensors (16 GiB here); now O(tiles)."""
    code, out, err = run_cli(
        ["analyze", str(ROOT / "patterns" / "causal.spd"), "-n", "2147483647", "--block", "1073741824"], scratch
    )
    assert code == 0, err
    assert "density                100.000% of causal pairs" in out
    assert "(2,147,483,647 keys)" in out


def test_a_checkerboard_pattern_is_refused_before_its_refinement_runs_away(scratch):
    """`every(2)` at unit 1 refines every partial tile into unit cells (O(seq**2) pieces): refused."""
    (scratch / "checker.spd").write_text("pattern checker() { causal attend every(2) }\n")
    code, out, err = run_cli(["analyze", "checker.spd", "--seq", "4096"], scratch)
    assert code == 1, out + err
    assert "counting the visible pairs of checker" in err and "still refining" in err
    assert "SPDSL_MAX_TILES=" in err
