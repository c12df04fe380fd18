"""tools/term_balance.py: each kd term's share of the student's own loss, read from a JSONL log."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import term_balance  # noqa: E402


def _log(tmp_path, records):
    path = tmp_path / "distilled.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _record(iteration, feature_kd):
    losses = {"classification": 0.5, "bbox_regression": 0.3, "bbox_ctrness": 0.2, "kd_cls": 0.25, "kd_feat": feature_kd}
    losses["loss"] = sum(losses.values())
    last = {"kd_cls": {"unscaled": 0.25, "weight": 1.0}, "kd_feat": {"unscaled": feature_kd, "weight": 1.0}}
    return {"iteration": iteration, "lr": 1e-3, "seconds": 1.0, "losses": losses, "kd_terms_last_step": last}


def test_shares_and_verdicts(tmp_path, capsys):
    # student loss 0.5 + 0.3 + 0.2 = 1.0: kd_cls is 0.25x; kd_feat 53x, then 8x, then 6x
    path = _log(tmp_path, [_record(50, 53.0), _record(100, 8.0), _record(150, 6.0)])
    assert term_balance.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "kd_cls: 0.250x  balanced" in out
    assert "kd_feat: 7.000x  dominates" in out  # median of the second half (8x, 6x)
    assert term_balance.shares(_record(50, 53.0)) == pytest.approx({"kd_cls": 0.25, "kd_feat": 53.0})


def test_logs_without_terms_and_bad_files(tmp_path, capsys):
    teacher = {"iteration": 50, "lr": 1e-3, "seconds": 1.0, "losses": {"classification": 0.5, "loss": 0.5}}
    assert term_balance.main([str(_log(tmp_path, [teacher]))]) == 0
    assert "no kd_ terms" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert term_balance.main([str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1 is not a JSON record" in capsys.readouterr().err
    assert term_balance.main([str(tmp_path / "missing.jsonl")]) == 2
