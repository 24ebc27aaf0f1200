"""The image listing: name order, depth first, an external sort for large directories, globs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from distinfer.data import _listing
from distinfer.errors import InputError


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def listed(pattern: str) -> list[str]:
    out = io.StringIO()
    _listing.write_listing(pattern, out)
    return out.getvalue().splitlines()


def test_a_directory_lists_its_images_depth_first_in_name_order(tmp_path: Path) -> None:
    touch(tmp_path, "b.jpg", "a/z.PNG", "a/c/y.webp", "c.txt", ".hidden.jpg", ".cache/x.jpg", "a.jpeg")
    assert listed(str(tmp_path)) == [str(tmp_path / n) for n in ("a/c/y.webp", "a/z.PNG", "a.jpeg", "b.jpg")]


def test_a_large_directory_is_sorted_in_runs_merged_from_disk(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{i * 7919 % 1000:04d}.jpg" for i in range(1000)]  # created out of order
    touch(tmp_path, *names)
    monkeypatch.setattr(_listing, "RUN", 64)  # 16 runs on disk
    assert listed(str(tmp_path)) == [str(tmp_path / n) for n in sorted(names)]


def test_globs_match_per_component_and_double_star_spans_directories(tmp_path: Path) -> None:
    touch(tmp_path, "x.jpg", "a/y.jpg", "a/b/z.jpg", "a/b/w.png")
    assert listed(str(tmp_path / "*.jpg")) == [str(tmp_path / "x.jpg")]
    assert listed(str(tmp_path / "*" / "*.jpg")) == [str(tmp_path / "a/y.jpg")]
    assert listed(str(tmp_path / "**" / "*.jpg")) == [str(tmp_path / n) for n in ("a/b/z.jpg", "a/y.jpg", "x.jpg")]
    assert listed(str(tmp_path / "a" / "**")) == [str(tmp_path / n) for n in ("a/b/w.png", "a/b/z.jpg", "a/y.jpg")]
    with pytest.raises(InputError, match=r"the folder '.*nowhere' does not exist"):
        listed(str(tmp_path / "nowhere" / "*.jpg"))
