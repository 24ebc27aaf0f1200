"""Shared fixtures. Worker processes are spawned, so test model factories live in an
importable module (`tests/helpers/toy_models.py`) whose folder is put on PYTHONPATH."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

HELPERS = Path(__file__).parent / "helpers"
REPO = Path(__file__).parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"

sys.path.insert(0, str(HELPERS))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(HELPERS), *filter(None, [os.environ.get("PYTHONPATH")])]
)


@pytest.fixture(scope="session", autouse=True)
def own_profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Profiles of the session's own: `--strategy auto` (the default) plans from cached
    profiles, and one measured on this machine before must not change a test's layout."""
    folder = tmp_path_factory.mktemp("profiles")
    before = os.environ.get("DISTINFER_PROFILES")
    os.environ["DISTINFER_PROFILES"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("DISTINFER_PROFILES", None)
    else:
        os.environ["DISTINFER_PROFILES"] = before


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    return CORPUS.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def small_corpus(tmp_path: Path, corpus_lines: list[str]) -> Path:
    """300 real verses, one per line."""
    path = tmp_path / "verses.txt"
    path.write_text("\n".join(corpus_lines[:300]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def vectors(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A .npy file of 500 rows x 16 float32 features."""
    data = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    path = tmp_path / "vectors.npy"
    np.save(path, data)
    return path, data
