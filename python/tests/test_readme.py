"""The README's Python block runs as printed: it is taken from README.md, not copied here."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import ROOT


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python section has one ```python block"
    return blocks[0]


def test_readme_python_example_runs_and_prints_what_it_claims():
    code = readme_python_block()
    assert len(code.strip().splitlines()) <= 10
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    size, used, evictions, *first = buf.getvalue().replace("[", " ").replace("]", " ").split()
    assert int(size) == 128  # the budget
    assert int(evictions) == 2 * 4 * (1000 - 128)  # every token past the budget, per layer and KV head
    assert int(used) > 0 and len(first) == 4
