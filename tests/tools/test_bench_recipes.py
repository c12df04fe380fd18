"""tools/bench_recipes.py: the significance rule, the resume/skip bookkeeping on fake results,
and an end-to-end --quick run on a tiny budget whose table, results.json and plot are checked."""
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densekd.data.categories import categories_path
from densekd.detection.models import build_detector
from densekd.evaluation import format_gain, paired_gain
from densekd.experiment.phases import DataFiles

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_recipes.py"


@pytest.fixture(scope="module")
def bench_tool():
    spec = importlib.util.spec_from_file_location("bench_recipes", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_gain_counts_only_beyond_twice_the_std_of_paired_differences():
    baseline = {0: 0.20, 1: 0.30, 2: 0.40}
    # Seeds move both runs a lot, the paired difference hardly: significant (the unpaired
    # spread of 0.1 would hide it).
    steady = paired_gain({0: 0.22, 1: 0.321, 2: 0.419}, baseline)
    assert steady.verdict == "better" and steady.n == 3 and math.isclose(steady.mean, 0.02, abs_tol=1e-12)
    assert paired_gain({0: 0.18, 1: 0.279, 2: 0.381}, baseline).verdict == "worse"
    assert paired_gain({0: 0.25, 1: 0.28, 2: 0.42}, baseline).verdict == "n.s."  # differences +5, -2, +2
    # Differences 0.5, 1.0, 1.5: mean exactly 2 x std (0.5): not beyond it, so not significant.
    ones = {0: 1.0, 1: 1.0, 2: 1.0}
    edge = paired_gain({0: 1.5, 1: 2.0, 2: 2.5}, ones)
    assert (edge.mean, edge.std, edge.verdict) == (1.0, 0.5, "n.s.")
    assert paired_gain({0: 1.51, 1: 2.0, 2: 2.49}, ones).verdict == "better"
    # Only seeds present and finite on both sides pair; fewer than two pairs: no spread, n.s.
    partial = paired_gain({0: 0.5, 1: float("nan"), 2: 0.9, 3: 0.7}, {0: 0.1, 1: 0.2, 2: None})
    assert (partial.n, partial.verdict, partial.mean) == (1, "n.s.", pytest.approx(0.4))
    assert format_gain(partial) == "+40.0 (n=1)"
    assert format_gain(steady) == "+2.0 ± 0.1 *"
    assert format_gain(paired_gain({0: 0.25, 1: 0.28, 2: 0.42}, baseline)) == "+1.7 ± 3.5 (n.s.)"
    assert format_gain(paired_gain({}, baseline)) == "-"


def _fake_record(run, ap, error=None):
    record = {"format": 1, "schedule": run.schedule, "recipe": run.recipe, "seed": run.seed,
              "iterations": run.iterations, "key": run.key, "error": error}  # fmt: skip
    if error is None:
        record.update(metrics={m: ap for m in ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf")}, train_seconds=1.0)
        record["per_class_ap"] = {"1": ap, "7": ap / 2}  # as read back from JSON: string category ids
    return record


def _bench(tool, tmp_path, recipes_dir, *extra):
    argv = ["--recipes-dir", str(recipes_dir), "--output", str(tmp_path / "out"), "--seeds", "0", "1",
            "--short-iterations", "10", "--long-iterations", "30", *extra]  # fmt: skip
    return tool.resolve_bench(tool.parse_args(argv))


def test_resume_skips_stored_runs_and_reruns_what_a_change_invalidates(bench_tool, tmp_path):
    tool = bench_tool
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("vanilla_kd", "self_distillation_ema"):
        shutil.copy(REPO / "configs" / "recipes" / f"{name}.yaml", recipes)
    (recipes / "typo.yaml").write_text("distill: {terms: [{loss: binary_kd, on: cls_logits, temprature: 2.0}]}\n")
    files = DataFiles(Path("a.json"), Path("a"), Path("b.json"), Path("b"), "fingerprint")
    bench = _bench(tool, tmp_path, recipes)
    teachers = tool.teacher_config(bench)
    runs = tool.plan_runs(bench, files, teachers)
    assert [(r.seed, r.schedule, r.recipe) for r in runs[:4]] == [
        (0, "short", "baseline"), (0, "short", "self_distillation_ema"), (0, "short", "typo"), (0, "short", "vanilla_kd")
    ]  # seed by seed, baseline first
    assert len(runs) == 2 * 2 * 4 and len({r.key for r in runs if r.key}) == 12
    typo = [r for r in runs if r.recipe == "typo"]
    assert all(r.key is None and "temprature" in r.error for r in typo)  # reported, never pending

    output = bench.output
    assert len(tool.pending_runs(runs, output)) == 12
    done = [r for r in runs if r.key][:7]
    for index, run in enumerate(done):
        tool.write_json_atomic(run.record_path(output), _fake_record(run, 0.1 * index, error="Boom" if index == 6 else None))
    assert not list((output / "runs").glob(".*.tmp"))  # the atomic write cleans up after itself
    pending = tool.pending_runs(runs, output)
    assert pending == [r for r in runs if r.key][7:]
    assert done[6] in tool.pending_runs(runs, output, retry_errors=True)  # a stored error is retried on request
    done[0].record_path(output).write_text('{"format": 1, "sched')  # e.g. copied half-way: redone
    assert tool.pending_runs(runs, output)[0] is done[0]

    # The same plan again has the same keys; a change reruns exactly what it determines.
    assert [r.key for r in tool.plan_runs(bench, files, teachers)] == [r.key for r in runs]
    logging_only = _bench(tool, tmp_path, recipes, "--set", "log_every=7")
    assert [r.key for r in tool.plan_runs(logging_only, files, tool.teacher_config(logging_only))] == [r.key for r in runs]
    longer = _bench(tool, tmp_path, recipes, "--long-iterations", "40")
    changed = [a.key != b.key for a, b in zip(tool.plan_runs(longer, files, teachers), runs) if a.key]
    assert changed == [r.schedule == "long" for r in runs if r.key]
    other_teacher = _bench(tool, tmp_path, recipes, "--set", "teacher_optim.iterations=77")
    replanned = tool.plan_runs(other_teacher, files, tool.teacher_config(other_teacher))
    # Only the runs distilled from the trained teacher depend on it (not baseline, not self-distillation).
    assert {r.recipe for r, old in zip(replanned, runs) if r.key != old.key} == {"vanilla_kd"}
    recipe_text = (recipes / "vanilla_kd.yaml").read_text()
    assert "temperature: 2.0" in recipe_text
    (recipes / "vanilla_kd.yaml").write_text(recipe_text.replace("temperature: 2.0", "temperature: 3.0"))
    edited = tool.plan_runs(bench, files, teachers)
    assert {r.recipe for r, old in zip(edited, runs) if r.key != old.key} == {"vanilla_kd"}

    records = tool.collect_records(runs, output)
    assert {r["recipe"] for r in records if r["key"] is None} == {"typo"}  # config errors reported every time
    assert len([r for r in records if r["key"]]) == 6  # the corrupt record is not read


def test_summary_table_marks_gains_errors_and_recipes_that_do_not_help(bench_tool, tmp_path):
    tool = bench_tool
    bench = _bench(tool, tmp_path, REPO / "configs" / "recipes", "--recipes", "vanilla_kd", "long_tail", "curriculum", "--seeds", "0", "1", "2")
    base = {0: 0.20, 1: 0.25, 2: 0.30}
    values = {"vanilla_kd": {0: 0.23, 1: 0.279, 2: 0.331}, "long_tail": {0: 0.21, 1: 0.24, 2: 0.32}}
    records = []
    for schedule in ("short", "long"):
        for seed in (0, 1, 2):
            run = tool.Run(schedule, "baseline", seed, bench.iterations[schedule], key="k")
            records.append(_fake_record(run, base[seed]))
            for recipe, per_seed in values.items():
                records.append(_fake_record(tool.Run(schedule, recipe, seed, 1, key="k"), per_seed[seed]))
            if schedule == "long":  # as if long_tail were self-distilled: its teacher's AP is reported
                records[-1]["self_teacher_metrics"] = {"AP": per_seed[seed] - 0.01}
            records.append(_fake_record(tool.Run(schedule, "curriculum", seed, 1, key="k"), None, error="ValueError: no | way"))
    summary = tool.summarize(records, ["short", "long"], bench.recipes)
    assert summary["short"]["vanilla_kd"]["verdict"] == "helps" and summary["short"]["long_tail"]["verdict"] == "no significant AP gain"
    assert summary["short"]["curriculum"]["verdict"] == "error"
    teacher = {"seed": 0, "metrics": {m: 0.4 for m in tool.STORED_METRICS}}
    table = tool.markdown_table(summary, bench, teacher)
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table.splitlines()[:8] if line.startswith("| ")]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["baseline"][:2] == ["25.0 ± 5.0", "25.0 ± 5.0"] and rows["teacher (seed 0, shared)"][0] == "40.0"
    assert rows["vanilla_kd"][6] == "+3.0 ± 0.1 *" and rows["vanilla_kd"][-1] == "helps"
    assert rows["long_tail"][6].endswith("(n.s.)") and rows["long_tail"][-1] == "no significant AP gain"
    assert rows["curriculum"][-1] == "error: ValueError: no \\| way"  # the message, escaped for markdown
    assert rows["vanilla_kd"][9] == "+20 %" and rows["baseline"][9] == "0 %"  # 3.0 of the 40.0 - 25.0 gap
    assert "Best recipe: vanilla_kd, ΔAP +3.0 ± 0.1 *, closing +20 % of the teacher-student gap." in table
    assert "long_tail: its self-distillation teacher ends at AP 24.7 ± 5.7, the student it taught at 25.7 ± 5.7." in table
    assert table.count("self-distillation teacher") == 1  # the long schedule's only
    weak = {"seed": 0, "metrics": {m: 0.2 for m in tool.STORED_METRICS}}  # below the baseline's 25.0
    no_gap = tool.markdown_table(summary, bench, weak)
    assert "no teacher-student gap to close" in no_gap and "Best recipe" not in no_gap
    document = json.loads(json.dumps(tool.jsonable(tool.summary_document(summary))))
    assert document["long"]["vanilla_kd"]["gains"]["APr"]["significant"] is True
    assert document["long"]["curriculum"]["gains"]["AP"]["n"] == 0
    tool.plot(summary, tmp_path / "gains.png", bench)
    assert (tmp_path / "gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Per category, most training images first: teacher, baseline mean ± std, paired gains by name.
    categories = [(1, "fish", 240), (7, "starfish", 37)]
    teacher["per_class_ap"] = {1: 0.5, 7: 0.3}
    per_class = tool.per_class_table(records, bench, categories, teacher)
    long_rows = per_class.split("long schedule")[1].splitlines()
    fish = next(line for line in long_rows if line.startswith("| fish (240)"))
    starfish = next(line for line in long_rows if line.startswith("| starfish (37)"))
    assert [c.strip() for c in fish.split("|")[1:-1]] == ["fish (240)", "50.0", "25.0 ± 5.0", "+3.0 ± 0.1 *", "+0.7 ± 1.5 (n.s.)", "-"]
    assert [c.strip() for c in starfish.split("|")[2:4]] == ["30.0", "12.5 ± 2.5"]
    tool.plot_per_class(records, bench, categories, teacher, tmp_path / "per_class_ap.png")
    assert (tmp_path / "per_class_ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_tool(args, env):
    done = subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def test_quick_benchmark_end_to_end_then_resumes_without_training(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(REPO / "configs" / "recipes" / "logit_cwd.yaml", recipes)
    # FCOS has no RoI head: this recipe builds but cannot distil, and must become an error row.
    (recipes / "roi_kd.yaml").write_text("distill: {terms: [{loss: kl, on: roi_class_logits}]}\n")
    output = tmp_path / "out"
    # 300 training images: enough for every LVIS frequency group, so APr, APc and APf are defined.
    tiny = ["data.synthetic={num_train: 300, num_val: 24, image_size: 64, max_object_size: 32}", "teacher.image_size=64",
            "student.image_size=64", "teacher_optim.iterations=2", "teacher_optim.warmup_iters=0"]  # fmt: skip
    args = ["--quick", "--threads", "1", "--recipes-dir", str(recipes), "--recipes", "logit_cwd", "roi_kd",
            "--short-iterations", "1", "--long-iterations", "2", "--batch-size", "2", "--output", str(output),
            "--keep-students", *[a for item in tiny for a in ("--set", item)]]  # fmt: skip
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    first = _run_tool(args, env)
    assert "[run 12/12]" in first.stdout and "ETA" in first.stdout

    report = json.loads((output / "results.json").read_text())
    assert (output / "gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["table"] == (output / "results.md").read_text().rstrip("\n")
    assert report["per_class_table"] == (output / "per_class.md").read_text().rstrip("\n")
    assert "| blue_circle (" in report["per_class_table"] and (output / "per_class_ap.png").is_file()
    assert set(report["summary"]) == {"short", "long"}
    runs = report["runs"]
    assert len(runs) == 2 * 2 * 3 and {r["seed"] for r in runs} == {0, 1}
    for schedule, iterations in (("short", 1), ("long", 2)):
        entries = report["summary"][schedule]
        assert list(entries) == ["baseline", "logit_cwd", "roi_kd"]
        assert "roi_class_logits" in entries["roi_kd"]["errors"]["0"] and entries["roi_kd"]["verdict"] == "error"
        for recipe in ("baseline", "logit_cwd"):
            assert entries[recipe]["seeds"] == [0, 1]
            for metric in ("AP", "AP50", "APr", "APc", "APf"):
                stats = entries[recipe]["metrics"][metric]
                assert stats["n"] == 2 and math.isfinite(stats["mean"]) and math.isfinite(stats["std"]), (schedule, recipe, metric)
        per_seed = {
            name: {r["seed"]: r["metrics"]["AP"] for r in runs if (r["schedule"], r["recipe"]) == (schedule, name)}
            for name in ("baseline", "logit_cwd")
        }
        differences = [per_seed["logit_cwd"][s] - per_seed["baseline"][s] for s in (0, 1)]
        gain = entries["logit_cwd"]["gains"]["AP"]
        assert gain["mean"] == pytest.approx(statistics.mean(differences)) and gain["std"] == pytest.approx(statistics.stdev(differences))
        assert gain["significant"] is (abs(statistics.mean(differences)) > 2 * statistics.stdev(differences))
        assert all(r["iterations"] == iterations for r in runs if r["schedule"] == schedule)
        section = report["table"].split(f"### {schedule} schedule")[1].split("###")[0]
        row = next(line for line in section.splitlines() if line.startswith("| logit_cwd "))
        assert row.split("|")[8].strip().endswith("*" if gain["significant"] else "(n.s.)")
        assert "| roi_kd " in section and "error: " in section
    assert "teacher (seed 0, shared)" in report["table"] and math.isfinite(report["teacher"]["metrics"]["AP"])

    # --keep-students: every trained student's weights beside its record, a plain torchvision state_dict
    kept = sorted((output / "runs").glob("*.pth"))
    assert len(kept) == 2 * 2 * 2  # baseline and logit_cwd, 2 schedules, 2 seeds; error rows train nothing
    student = build_detector("fcos_resnet18_fpn64", num_classes=12, image_size=64)
    student.load_state_dict(torch.load(kept[0], weights_only=True), strict=True)
    assert all(categories_path(path).is_file() for path in kept)

    # A second invocation finds every run stored: it trains nothing and reports the same results.
    again = _run_tool([*args, "--json"], env)
    assert "0 to train" in again.stderr and "[run " not in again.stderr
    assert json.loads(again.stdout)["summary"] == report["summary"]
