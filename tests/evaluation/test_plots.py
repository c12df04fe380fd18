"""The per-class AP plot is a real PNG, with classes in frequency order."""
import math

from densekd.evaluation import plot_per_class_ap


def test_per_class_ap_plot_writes_a_png(tmp_path, monkeypatch):
    drawn = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_xticklabels

    def record(self, labels, *args, **kwargs):
        drawn["labels"] = list(labels)
        return original(self, labels, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticklabels", record)
    path = plot_per_class_ap(
        {"teacher": {1: 0.5, 2: 0.25, 3: math.nan}, "student": {1: 0.4, 2: 0.1, 3: 0.0}},
        {1: "cat", 2: "dog", 3: "yak"},
        {1: 5, 2: 300, 3: 40},
        tmp_path / "sub" / "ap.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["labels"] == ["dog\n(300)", "yak\n(40)", "cat\n(5)"]
