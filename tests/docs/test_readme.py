"""The README's Python example runs as written (tiny torchvision models, one step)."""
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_matches_the_tool_and_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    example = (ROOT / "tools" / "example_distill_step.py").read_text()
    assert blocks[0].strip() in example, "README example and tools/example_distill_step.py differ"
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "tools" / "example_distill_step.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "kd_roi_class_logits_kl" in printed and "loss_classifier" in printed
    assert (tmp_path / "student.pth").exists()
