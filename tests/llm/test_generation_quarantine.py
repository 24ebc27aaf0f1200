"""Quarantine of generation rows (`--max-bad-rows`): a prompt that cannot be read or that the
model's preparation refuses is set aside, and every other row is generated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

import distinfer


def test_a_generation_row_the_model_refuses_is_set_aside(
    gemma_path: Path, tmp_path: Path, corpus_lines: list[str]
) -> None:
    lines = [json.dumps({"prompt": t}) for t in corpus_lines[:12]]
    lines[3] = json.dumps({"prompt": [{"role": "user"}]})  # a chat message with no content
    lines[9] = '{"prompt": "unterminated'
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    report = distinfer.run(model=str(gemma_path), input=str(path), output=str(out), workers=1, max_tokens=2,
                           max_running=4, strategy="data", max_bad_rows=2)
    found = ds.dataset(str(out / "_errors")).to_table().sort_by("row").to_pylist()
    assert [(e["row"], e["stage"]) for e in found] == [(3, "preprocess"), (9, "read")]
    assert found[0]["message"].startswith("prompts.jsonl row 3 (line 4): ")
    assert "not valid JSON" in found[1]["message"] and "unterminated" in found[1]["input"]
    got = ds.dataset(str(out)).to_table().sort_by("row")
    np.testing.assert_array_equal(got.column("row").to_numpy(), [r for r in range(12) if r not in (3, 9)])
    assert all(n >= 1 for n in got.column("completion_tokens").to_pylist())
    assert report.bad_rows == 2
