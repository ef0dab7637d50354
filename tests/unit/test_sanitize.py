"""Every text from a bundle is sanitised before a terminal or Markdown.

The rule: the CLI writes everything through one sanitiser
(runner._internal.sanitize.terminal_text, installed by runner.cli.output.safe_streams),
Markdown renderers take the predicate through runner.render.safe.markdown_view (no raw
HTML, no line breaks), terminal tables put each value on one line. A bundle whose every
string is hostile is pushed through every command that shows bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner._internal.sanitize import map_strings, markdown_text, one_line, terminal_text
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store
from runner.cli.main import main
from runner.model.predicate import RunPredicate
from runner.render.markdown import render_markdown
from runner.render.safe import markdown_view

pytestmark = pytest.mark.unit

HOSTILE = (
    "\x1b[31mRED\x1b[0m \x1b]0;owned\x07 \x9b2J <script>alert(1)</script> <b>x</b> a|b "
    "\r\nforged: verification: valid \u202etxt.exe \u2028 \x00 \x7f end"
)
# what must never reach a terminal or a Markdown viewer
FORBIDDEN = ("\x1b", "\x07", "\x9b", "\r", "\u202e", "\u2028", "\udcff", "\x00", "\x7f")
# fields whose value is an enum or a pattern: kept valid so the bundle reads
_STRUCTURAL = {"run_id", "outcome", "direction", "role", "verdict", "kind", "method"}


def _hostile_predicate(run_id: str, **changes: object) -> dict:
    def walk(value: object, key: str = "") -> object:
        if isinstance(value, str):
            return value if key in _STRUCTURAL else f"{value} {HOSTILE}"
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        return value

    data = walk(predicate(run_id=run_id, **changes))
    assert isinstance(data, dict)
    data["params"] = {HOSTILE: HOSTILE}
    data["reason"] = HOSTILE
    return data


def _clean(text: str) -> None:
    for char in FORBIDDEN:
        assert char not in text, (char, text[:300])
    assert "\nforged:" not in text


@pytest.fixture
def hostile_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    signer = load_signer(home / "keys" / "evalrun.key")
    for letter in "ab":
        store_run(
            Store(home),
            signer,
            _hostile_predicate("r-" + letter * 24, comparison_group="g", **{"seeds.seed": 1}),
        )
    return home


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "ls"],
        ["runs", "ls", "--json"],
        ["runs", "show", "r-" + "a" * 24],
        ["runs", "show", "r-" + "a" * 24, "--json"],
        ["report", "r-" + "a" * 24, "--format", "md"],
        ["report", "r-" + "a" * 24, "--format", "html"],
        ["diff", "r-" + "a" * 24, "r-" + "b" * 24],
        ["diff", "r-" + "a" * 24, "r-" + "b" * 24, "--json"],
        ["compare", "g"],
        ["compare", "g", "--format", "md"],
        ["compare", "g", "--json"],
        ["rerun", "r-" + "a" * 24, "--check"],
        ["verify", "NOWHERE\x1b[31m", "--key", "KEY"],
    ],
)
def test_no_control_character_from_a_bundle_reaches_the_terminal(
    hostile_home: Path, argv: list[str], capsys
) -> None:
    argv = [str(hostile_home / "keys" / "evalrun.pub") if a == "KEY" else a for a in argv]
    main(argv)
    out, err = capsys.readouterr()
    _clean(out)
    _clean(err)
    if "--json" in argv:
        json.loads(out)  # still one JSON document
    if "md" in argv:
        assert "<script" not in out and "<b>" not in out


def test_a_report_file_holds_no_raw_html_or_control_characters(
    hostile_home: Path, tmp_path: Path
) -> None:
    for fmt in ("md", "html"):
        out = tmp_path / f"r.{fmt}"
        assert main(["report", "r-" + "a" * 24, "--format", fmt, "-o", str(out)]) == 0
        text = out.read_text()
        _clean(text)
        assert "<script" not in text and "<b>x" not in text


def test_markdown_view_escapes_html_and_keeps_ordinary_predicates_byte_identical() -> None:
    plain = RunPredicate.model_validate(predicate())
    assert markdown_view(plain) == plain
    md = render_markdown(RunPredicate.model_validate(_hostile_predicate("r-" + "c" * 24)))
    assert "<script" not in md and "&lt;script&gt;" in md
    _clean(md)


def test_the_sanitisers_show_what_they_escape() -> None:
    assert terminal_text("a\x1b[31mb\nc\td") == "a\\x1b[31mb\nc\td"
    assert one_line("a\nb\tc\rd") == "a\\nb\\tc\\x0dd"
    assert one_line("\u202e\udcff") == "\\u202e\\udcff"
    assert markdown_text("<a href='x'>|</a> & b") == "&lt;a href='x'&gt;\\|&lt;/a&gt; &amp; b"
    assert one_line("x" * 5000, limit=10) == "x" * 10 + "…(4990 more characters)"
    assert terminal_text("plain — text ✓") == "plain — text ✓"
    assert map_strings({"\x1b": ["\x1b", 1, None]}, one_line) == {"\\x1b": ["\\x1b", 1, None]}


def test_the_terminal_guard_finds_every_character_it_escapes_in_a_large_output() -> None:
    """The guard's fast path drops plain ASCII and runs the regex over what is left: it
    must see every character the regex would, wherever it sits in a large output."""
    from runner._internal.sanitize import _PLAIN_ASCII, _TERMINAL, _has_invisible, _shown

    assert not any(_TERMINAL.match(chr(b)) for b in _PLAIN_ASCII)
    table = "run id  spec  metrics\n" + "r-1  s — ✓  acc=0.9000 …\tx\n" * 20_000
    assert not _has_invisible(table) and terminal_text(table) is table
    for char in ("\x00", "\x1b", "\x7f", "\x85", "\u00ad", "\u115f", "\u202e", "\ufe0f",
                 "\U000e0041", "\udcff", "\r"):
        for at in (0, len(table) // 2, len(table)):
            text = table[:at] + char + table[at:]
            assert _has_invisible(text), (char, at)
            assert terminal_text(text) == _TERMINAL.sub(_shown, text)
    # every code point, in one text: exactly the regex's matches survive the fast path
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    rest = every.encode("utf-8").translate(None, _PLAIN_ASCII).decode("utf-8")
    plain = _PLAIN_ASCII.decode()
    assert rest == "".join(c for c in every if c not in plain)
    assert _TERMINAL.findall(rest) == _TERMINAL.findall(every)


def test_lone_surrogates_in_a_handed_over_bundle_are_shown_escaped(
    hostile_home: Path, tmp_path: Path, capsys
) -> None:
    # evalrun never writes one, but JSON can spell it: a bundle handed over, read unverified
    import shutil

    bundle = tmp_path / "odd"
    stored = Store(hostile_home).find_run("r-" + "a" * 24)
    assert stored is not None
    shutil.copytree(stored.path, bundle)
    for path in bundle.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    statement = (bundle / "statement.json").read_text()
    (bundle / "statement.json").write_text(statement.replace("digits-logreg", "\\udcff\\ud800x"))
    for argv in (["runs", "show", str(bundle)], ["report", str(bundle), "--format", "md"]):
        assert main([*argv, "--no-verify"]) == 0
        out, err = capsys.readouterr()
        _clean(out)
        assert "\\udcff" in out
