"""Image inputs: a directory or a glob of image files, listed once into a text file.

The listing is written as it is walked, one absolute path per line, so the driver never
holds the names of a million files: each directory's entries are sorted in runs of at most
`RUN` names, spilled to temporary files and merged (an external sort) when a directory holds
more. The listed file is then an ordinary line source (format "images", one column "path"):
blocks are line ranges of it, found by the same streaming scan as a text file's. It is kept
in the output directory (`LISTING`), so a resumed job reads the very same listing even if
files were added since; `--overwrite` lists again.

A directory lists the files whose suffix is an image's (`IMAGE_SUFFIXES`), in every
subdirectory; a glob lists every file it matches (`**` spans directories). Hidden files and
directories (a leading dot) are skipped.
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO

from distinfer.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "LISTING", "is_image_input", "list_images", "write_listing"]

LISTING = "_listing.txt"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: names sorted in memory at once; a larger directory is sorted in runs merged from disk
RUN = 100_000
_MAGIC = re.compile(r"[*?[]")


def is_image_input(path: str) -> bool:
    """Whether `--input` names images: a local directory or a glob pattern."""
    return "://" not in path and (os.path.isdir(path) or bool(_MAGIC.search(path)))


def _sorted_names(folder: str) -> Iterator[str]:
    """`folder`'s visible entry names in order, holding at most `RUN` of them in memory."""
    runs: list[IO[str]] = []
    chunk: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                chunk.append(entry.name)
                if len(chunk) >= RUN:
                    runs.append(_spill(sorted(chunk)))
                    chunk = []
        chunk.sort()
        yield from heapq.merge(*(_lines(f) for f in runs), iter(chunk)) if runs else chunk
    finally:
        for f in runs:
            f.close()


def _spill(names: list[str]) -> IO[str]:
    """`names` in a temporary file, read back from its start (closed by the caller)."""
    f = tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    f.writelines(name + "\n" for name in names)
    f.seek(0)
    return f


def _lines(f: IO[str]) -> Iterator[str]:
    for line in f:
        yield line[:-1]


def _walk(folder: str, deep: bool = True) -> Iterator[str]:
    """Every file in `folder` (`deep`: and under it, depth first; symbolic links to
    directories are not followed), each directory's entries in name order."""
    for name in _sorted_names(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            if deep and not os.path.islink(path):
                yield from _walk(path)
        elif os.path.isfile(path):
            yield path


def _root_and_rest(pattern: str) -> tuple[str, list[str]]:
    """A glob's fixed leading directory and its remaining components."""
    parts = os.path.abspath(os.path.expanduser(pattern)).split(os.sep)
    first = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    return os.sep.join(parts[:first]) or os.sep, parts[first:]


def _match(parts: list[str], patterns: list[str]) -> bool:
    """Whether a relative path's components match a glob's (`**`: any number of them)."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_match(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _match(parts[1:], patterns[1:])


def _matches(pattern: str) -> tuple[str, Iterator[str]]:
    """A glob's root folder and the files under it that it matches, in walk order."""
    root, rest = _root_and_rest(pattern)
    deep = "**" in rest or len(rest) > 1

    def files() -> Iterator[str]:
        for path in _walk(root, deep):
            if _match(os.path.relpath(path, root).split(os.sep), rest):
                yield path

    return root, files()


def write_listing(input: str, dest: IO[str]) -> tuple[int, int]:
    """List `input`'s image files into `dest`, one absolute path per line, in name order.
    Returns (files listed, files skipped because their suffix is not an image's)."""
    if os.path.isdir(input):
        root, paths = os.path.abspath(input), _walk(os.path.abspath(input))
        by_suffix = True
    else:
        root, paths = _matches(input)
        by_suffix = False
        if not os.path.isdir(root):
            raise InputError(f"input '{input}': the folder '{root}' does not exist; check --input")
    listed = skipped = 0
    for path in paths:
        if "\n" in path or "\r" in path:
            raise InputError(f"image file name {path!r} holds a line break; rename it")
        if by_suffix and os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
            skipped += 1
            continue
        dest.write(path + "\n")
        listed += 1
    if not listed:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        what = (f"directory '{input}' holds no image files ({suffixes})" if by_suffix
                else f"pattern '{input}' matches no file")
        raise InputError(f"input {what}; give an input file, or a directory or glob of images, with --input")
    return listed, skipped


def list_images(input: str) -> tuple[str, int, int]:
    """`input`'s listing in a new temporary file: (its path, files listed, files skipped)."""
    fd, tmp = tempfile.mkstemp(prefix="distinfer-listing-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            listed, skipped = write_listing(input, f)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp, listed, skipped
