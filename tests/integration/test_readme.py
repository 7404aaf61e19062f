"""The README's "Bring your own model" example runs as written."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_the_bring_your_own_model_example_runs(ray_local, tmp_path, monkeypatch):
    text = open(README).read()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "Trainer(" in code and "model=model" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.steps_completed == 200 and "mae" in result.eval_metrics
    assert (tmp_path / "model.pt").exists()
