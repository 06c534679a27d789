"""The README's library example runs as written (offline, tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    counts = dict(re.findall(r"^(.+?) (\d+)$", out, re.M))
    total = int(counts["all four flags on"])
    assert int(counts["{'finetune_vision_layers': False}"]) + int(counts["{'finetune_language_layers': False}"]) == total
    assert "loss" in out
