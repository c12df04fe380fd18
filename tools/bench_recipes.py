"""Seeded quality benchmark of every distillation recipe: does a recipe beat the baseline by
more than the seed noise, far from the teacher (short schedule) and closer to it (long)?

    python tools/bench_recipes.py --output runs/bench_recipes           # the full benchmark (hours, see Budget)
    python tools/bench_recipes.py --quick --output runs/bench_quick     # smoke run (~2 min): tiny data and budgets
    python tools/bench_recipes.py --recipes vanilla_kd long_tail --seeds 0 1 2 3 4
    python tools/bench_recipes.py --json --output runs/bench_recipes > bench.json   # results.json on stdout
    python tools/bench_recipes.py --recipes vanilla_kd --seeds 0 --keep-students   # + each student's weights

On the demo's embedded long-tailed dataset (configs/experiments/demo.yaml: 2000 train / 300
class-balanced val images of 96 px, 12 classes) it trains, for every seed and schedule, the
baseline student and one distilled student per recipe (every configs/recipes/*.yaml unless
--recipes narrows it), all with the same budget, and evaluates each (COCO AP, AP50,
LVIS-style APr/APc/APf, training seconds). It writes, in --output:

    results.md    the table: mean ± std over seeds per (schedule, recipe), gain over the
                  baseline of the same schedule with its significance, a verdict per recipe
    gains.png     gain over the baseline per recipe with seed error bars, APr and APf side
                  by side, both schedules
    results.json  every per-seed run, the teacher's metrics, the summary and the table
    runs/         one JSON per finished (schedule, recipe, seed), written atomically as soon
                  as that run ends (a self-distillation run also evaluates its EMA/snapshot
                  teacher: is it better than the student it teaches?); with --keep-students also
                  the student's state_dict beside it (same name, .pth; for tools/eval_det.py
                  --ckpt, e.g. with --per-class)

Significance (densekd.evaluation.gains): runs are paired by seed (a recipe and the baseline
trained with seed s share initial weights and batch order); the gain is the mean of the
per-seed differences recipe - baseline, and it counts (``+2.1 ± 0.5 *``) only when its size
exceeds twice the sample std of those paired differences; otherwise it is ``(n.s.)``. The
verdict column says "helps" / "hurts" / "no significant AP gain" from the AP gain.

Shared and varied: the teacher is trained once from the experiment's seed (0) through
densekd's teacher cache ($DENSEKD_CACHE/teachers, reused from the demo when it trained the same
teacher), and shared by all seeds and recipes, as is multi_teacher's extra teacher: the spread
measures the student (initial weights, batch order, augmentation draws), not the teacher. A
recipe is the whole package its file describes: its sampler, augmentation and label smoothing
count towards its gain over one baseline trained plainly with the experiment's pipeline.
Warm-up scales with the schedule (the experiment's warm-up fraction, 50/300 for the demo).

Resuming: re-run the same command. Finished runs are skipped; each is keyed by everything
that determines it (resolved student config, teacher config, data), so changing a budget or a
recipe reruns exactly what it changes (not the code: after editing densekd, use a new
--output). A killed benchmark loses at most the run in progress, which restarts (runs are
checkpointed at their end only, unless ``--set checkpoint_every=N``; then it resumes from
--output/work/).
Runs go seed by seed (baseline and every recipe, both schedules), so a partial benchmark
already covers every recipe. A recipe that fails (e.g. a term its model lacks) becomes an
"error: message" row and is not retried unless --retry-errors.

Budget. Defaults: short 50 / long 300 student iterations at the demo's batch 8, seeds 0 1 2:
3 seeds x 12 configurations (baseline + 11 recipes) x 2 schedules = 72 student runs. Measured
(README, 2026-12-03): with the demo's 1500-iteration teacher (72.8 AP) the baseline reaches
35 % of the teacher's AP at 300 iterations and 4 % at 50: both regimes are far from the
teacher. With the former 500-iteration teacher (29.9 AP, 2026-11-29) they were 88 % and 11 %,
and the full benchmark took 1 h 35 min on the idle 2-core development machine as three
processes side by side, one per seed (``--seeds 0``, ``--seeds 1``, ``--seeds 2``; 1 thread
each, one shared --output), multi_teacher's second teacher included; then the plain command
assembled the table without training. Training seconds per run at those settings: baseline
33 / 241 (short / long), the recipes 49-95 / 225-488; evaluation and set-up add ~10 s a run.
multi_teacher's second teacher now trains the demo's 1500 iterations, as long as the first.
Several processes may share one --output (each run's record is written atomically when it
ends) if they train different runs: split by --seeds, and let one process reach multi_teacher
first (or run ``--recipes multi_teacher --seeds 0`` alone) so that its second teacher is
trained once and cached.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # train_det's quick settings, also when this file is imported
    sys.path.insert(0, str(TOOLS))

from train_det import QUICK_OVERRIDES, jsonable  # noqa: E402

from densekd._names import did_you_mean  # noqa: E402
from densekd.data import CocoDetectionDataset, collate_detection  # noqa: E402
from densekd.detection.experiment import DETECTION  # noqa: E402
from densekd.evaluation import (  # noqa: E402
    SIGNIFICANCE_FACTOR,
    PairedGain,
    SeedSummary,
    evaluate,  # noqa: E402
    format_gain,
    format_mean_std,
    paired_gain,
    plot_gains,
    plot_per_class_ap,
    seed_summary,
)
from densekd.experiment.config import (  # noqa: E402
    RECIPES_DIR,
    ConfigError,
    ExperimentConfig,
    load_experiment_config,
    parse_overrides,
    read_yaml,
)
from densekd.experiment.phases import DataFiles, data_files, prepare_teachers, train_student  # noqa: E402
from densekd.data.categories import write_categories  # noqa: E402
from densekd.training import TrainingInterrupted  # noqa: E402
from densekd.training.checkpoints import save_checkpoint  # noqa: E402

DEFAULT_CONFIG = TOOLS.parent / "configs" / "experiments" / "demo.yaml"
BASELINE = "baseline"
SCHEDULES = ("short", "long")
METRICS = ("AP", "AP50", "APr", "APc", "APf")  # the table's, in this order
STORED_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf")
TABLE_GAINS = ("AP", "APr", "APf")
PLOT_GAINS = ("APr", "APf")
RECORD_FORMAT = 1
DEFAULTS = {"seeds": [0, 1, 2], "short": 50, "long": 300, "batch_size": 8}  # see "Budget" above
# --quick: train_det's quick data and teacher budget, two seeds (so a spread exists), two recipes.
QUICK = {"seeds": [0, 1], "short": 4, "long": 12, "batch_size": 8, "recipes": ["logit_cwd", "self_distillation_ema"]}
FLAG_KEYS = {  # set by the benchmark for every run: --set may not change them
    "recipe": "--recipes",
    "seed": "--seeds",
    "optim.iterations": "--short-iterations / --long-iterations",
    "data.batch_size": "--batch-size",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: the demo)")
    parser.add_argument("--recipes", nargs="+", metavar="NAME", help="recipes to run (default: every file of --recipes-dir)")
    parser.add_argument("--recipes-dir", default=str(RECIPES_DIR), help="folder of recipe YAML files")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"student seeds (default: {' '.join(map(str, DEFAULTS['seeds']))})")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES), help="which schedules to run")
    parser.add_argument("--short-iterations", type=int, help=f"student iterations, short schedule (default {DEFAULTS['short']})")
    parser.add_argument("--long-iterations", type=int, help=f"student iterations, long schedule (default {DEFAULTS['long']})")
    parser.add_argument("--batch-size", type=int,
                        help=f"student batch size (default {DEFAULTS['batch_size']}; the teacher keeps the experiment's)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and budgets, 2 seeds, 2 recipes; little signal")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value of every run, e.g. optim.lr=0.002")  # fmt: skip
    parser.add_argument("--output", default="runs/bench_recipes", help="per-run results, the table, the plot and results.json")
    parser.add_argument("--retry-errors", action="store_true", help="rerun runs that failed earlier instead of reporting their error")
    parser.add_argument("--keep-students", action="store_true", help="save each trained student's state_dict beside its "
                        "record (runs/<run>.pth), for tools/eval_det.py --ckpt; runs finished earlier are not retrained for it")
    parser.add_argument("--json", action="store_true", help="print results.json on stdout (progress goes to stderr)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


# --- settings, configs and keys ---------------------------------------------------------
@dataclass
class Bench:
    """What the benchmark runs; resolved from the command line."""

    config_path: Path
    recipes_dir: Path
    recipes: list[str]
    seeds: list[int]
    iterations: dict[str, int]  # schedule -> student iterations
    batch_size: int
    quick_overrides: list[str]  # --quick's data and teacher budget
    user_overrides: list[str]  # --set's: applied last, to every config
    output: Path
    keep_students: bool = False  # --keep-students: each student's state_dict beside its record

    @property
    def quick(self) -> bool:
        return bool(self.quick_overrides)


def resolve_bench(args: argparse.Namespace) -> Bench:
    """Defaults (full or --quick) filled in and every choice checked, with errors that say what to do."""
    defaults = {**DEFAULTS, **QUICK} if args.quick else dict(DEFAULTS)
    recipes_dir = Path(args.recipes_dir)
    # Detection recipes only: seg_* recipes distill segmenters (tools/train_seg.py).
    available = sorted(p.stem for p in recipes_dir.glob("*.yaml") if not p.stem.startswith("seg_"))
    if not available:
        raise ConfigError(f"--recipes-dir {recipes_dir} holds no recipe (*.yaml).")
    recipes = list(args.recipes or defaults.get("recipes") or available)
    for name in recipes:
        if name == BASELINE:
            raise ConfigError(f"--recipes: {BASELINE!r} is always run; name only recipes.")
        if name not in available:
            raise ConfigError(
                f"--recipes: unknown recipe {name!r}.{did_you_mean(name, available)} Recipes: {', '.join(available)}."
            )
    seeds = list(args.seeds if args.seeds is not None else defaults["seeds"])
    for what, values in (("--recipes", recipes), ("--seeds", seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{what}: each value at most once, got {' '.join(map(str, values))}.")
    short = args.short_iterations if args.short_iterations is not None else defaults["short"]
    long = args.long_iterations if args.long_iterations is not None else defaults["long"]
    batch_size = args.batch_size if args.batch_size is not None else defaults["batch_size"]
    for flag, value in (("--short-iterations", short), ("--long-iterations", long), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}.")
    if short >= long and len(args.schedules) == 2:
        raise ConfigError(f"--short-iterations ({short}) must be below --long-iterations ({long}).")
    for assignment in args.set:
        key = assignment.split("=", 1)[0].strip()
        if key in FLAG_KEYS:
            raise ConfigError(f"--set {key}: the benchmark sets it for every run; use {FLAG_KEYS[key]}.")
    parse_overrides(args.set)  # malformed KEY=VALUE: fail now, not in the first run
    iterations = {s: n for s, n in (("short", short), ("long", long)) if s in args.schedules}
    quick = list(QUICK_OVERRIDES) if args.quick else []
    return Bench(Path(args.config), recipes_dir, recipes, seeds, iterations, batch_size, quick, list(args.set), Path(args.output),
                 args.keep_students)  # fmt: skip


def teacher_config(bench: Bench) -> ExperimentConfig:
    """The experiment without a recipe: its teacher, teacher budget, seed and batch size."""
    overrides = [*bench.quick_overrides, "recipe=null", *bench.user_overrides]
    return load_experiment_config(bench.config_path, overrides, bench.recipes_dir)


def student_config(bench: Bench, recipe: str, seed: int, iterations: int) -> ExperimentConfig:
    """One run's config: the experiment with ``recipe`` (none for the baseline), the student
    ``seed`` and budget. Warm-up keeps the experiment's fraction of the run, and the only
    checkpoint is the final one (a killed run restarts: it lasts minutes, and a checkpoint of
    student, teacher and optimizer costs hundreds of MB of writes), unless --set says otherwise."""
    experiment = teacher_config(bench)  # the experiment's own schedule, before the budget below
    warmup = round(iterations * experiment.optim.warmup_iters / max(experiment.optim.iterations, 1))
    run = [
        "recipe=null" if recipe == BASELINE else f"recipe={recipe}",
        f"seed={seed}",
        f"optim.iterations={iterations}",
        f"optim.warmup_iters={warmup}",
        f"data.batch_size={bench.batch_size}",
        f"checkpoint_every={iterations}",
    ]
    return load_experiment_config(bench.config_path, [*bench.quick_overrides, *run, *bench.user_overrides], bench.recipes_dir)


def uses_teachers(config: ExperimentConfig) -> bool:
    """Distilled from trained teachers: not the baseline, not self-distillation."""
    return config.distill is not None and not config.distill.get("self_distillation")


def teacher_identity(teachers: ExperimentConfig, extra: Sequence[Any]) -> dict[str, Any]:
    """Everything that determines the teachers of a run (what the teacher cache keys on)."""
    return {
        "teacher": dataclasses.asdict(teachers.teacher),
        "extra_teachers": [dataclasses.asdict(section) for section in extra],
        "teacher_optim": dataclasses.asdict(teachers.teacher_optim),
        "seed": teachers.seed,
        "data": dataclasses.asdict(teachers.data),
    }


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_key(config: ExperimentConfig, teachers: ExperimentConfig, files: DataFiles) -> str:
    """Hash of everything that determines a run's result: the student's config, the teachers'
    identity when it distils from them, the data. Logging and checkpoint frequency left out."""
    student = dataclasses.asdict(config)
    for key in ("checkpoint_every", "log_every", "teacher", "extra_teachers", "teacher_optim"):
        student.pop(key)
    payload = {"format": RECORD_FORMAT, "student": student, "data": files.fingerprint, "val": str(files.val_ann)}
    if uses_teachers(config):
        payload["teachers"] = teacher_identity(teachers, config.extra_teachers)
    return digest(payload)


def overridden_recipe_values(config: ExperimentConfig, recipe_file: Path) -> list[str]:
    """Settings the recipe file makes that the experiment (or --set) overrides, so the recipe
    does not run as written: a section-wise merge lets the experiment win."""
    values = read_yaml(recipe_file) or {}
    notes = []
    for section in ("data", "augment", "optim"):
        for key, wanted in (values.get(section) or {}).items():
            got = getattr(getattr(config, section), key, wanted)
            if got != wanted and not (isinstance(got, float) and isinstance(wanted, int) and got == float(wanted)):
                notes.append(
                    f"{recipe_file.stem}: {section}.{key} is {got!r}, not the recipe's {wanted!r} (the experiment or --set overrides it)"
                )
    return notes


# --- the plan and the stored results -----------------------------------------------------
@dataclass
class Run:
    schedule: str
    recipe: str
    seed: int
    iterations: int
    config: Optional[ExperimentConfig] = None
    key: Optional[str] = None  # None: the config could not be built (see error)
    error: Optional[str] = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.schedule}__{self.recipe}__seed{self.seed}"

    def record_path(self, output: Path) -> Path:
        return output / "runs" / f"{self.name}__{self.key}.json"

    def work_dir(self, output: Path) -> Path:
        return output / "work" / f"{self.name}__{self.key}"


def plan_runs(bench: Bench, files: DataFiles, teachers: ExperimentConfig) -> list[Run]:
    """Every (seed, schedule, baseline-then-recipes) run, in the order they train."""
    runs = []
    for seed in bench.seeds:
        for schedule, iterations in bench.iterations.items():
            for recipe in [BASELINE, *bench.recipes]:
                run = Run(schedule, recipe, seed, iterations)
                try:
                    run.config = student_config(bench, recipe, seed, iterations)
                    run.key = run_key(run.config, teachers, files)
                    if recipe != BASELINE:
                        run.notes = overridden_recipe_values(run.config, bench.recipes_dir / f"{recipe}.yaml")
                except (ConfigError, ValueError) as error:
                    run.error = f"{type(error).__name__}: {error}"
                runs.append(run)
    return runs


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """A stored run result, or None when absent or unreadable (a record is written atomically,
    so unreadable means foreign or of another format: it is redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def write_json_atomic(path: Path, document: Any) -> None:
    """Write JSON through a temporary file in the same folder and ``os.replace``: a kill never
    leaves a half-written result where a complete one is expected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(jsonable(document), file, indent=2)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def pending_runs(runs: Iterable[Run], output: Path, retry_errors: bool = False) -> list[Run]:
    """The runs still to do: no stored record under their key (a changed config changes the
    key), or a stored error when ``retry_errors``. Runs whose config failed are not pending:
    they are reported, and rebuilt (cheaply) on every invocation."""
    pending = []
    for run in runs:
        if run.key is None:
            continue
        record = read_record(run.record_path(output))
        if record is None or (retry_errors and record.get("error")):
            pending.append(run)
    return pending


def config_error_record(run: Run) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "schedule": run.schedule, "recipe": run.recipe, "seed": run.seed,
            "iterations": run.iterations, "key": None, "error": run.error}  # fmt: skip


def collect_records(runs: Iterable[Run], output: Path) -> list[dict[str, Any]]:
    """The plan's results in plan order: stored records, config errors; runs not done yet are absent."""
    records = []
    for run in runs:
        record = config_error_record(run) if run.key is None else read_record(run.record_path(output))
        if record is not None:
            records.append(record)
    return records


# --- training and evaluation -------------------------------------------------------------
class Workbench:
    """Data, the shared teachers (trained or loaded once, lazily) and the evaluation of one benchmark."""

    def __init__(self, bench: Bench, files: DataFiles, teachers: ExperimentConfig) -> None:
        self.bench, self.files, self.teacher_config = bench, files, teachers
        self.val_set = CocoDetectionDataset(files.val_images, files.val_ann)
        self.num_classes = self.val_set.num_classes
        self.train_set = CocoDetectionDataset(files.train_images, files.train_ann)
        # APr/APc/APf groups: the file's, else from the training split's image counts (plain COCO)
        self.frequencies = self.train_set.lvis_frequencies()
        self._teachers: dict[str, tuple[list[torch.nn.Module], list[dict[str, Any]]]] = {}
        self._errors_seen: set[str] = set()
        self.teacher_seconds = 0.0  # spent training or loading teachers: left out of the ETA

    def categories(self) -> list[tuple[int, str, int]]:
        """(category id, name, training images) per class, most training images first."""
        rows = [(self.val_set.label_to_category_id[label], name, self.train_set.image_counts[label - 1])
                for label, name in enumerate(self.val_set.categories, start=1)]  # fmt: skip
        return sorted(rows, key=lambda row: (-row[2], row[0]))

    def teachers(self, extra: Sequence[Any] = ()) -> tuple[list[torch.nn.Module], list[dict[str, Any]]]:
        """The experiment's teacher (seed of the experiment) plus ``extra`` teachers, from the cache."""
        key = digest([dataclasses.asdict(section) for section in extra])
        if key not in self._teachers:
            started = time.perf_counter()
            config = dataclasses.replace(self.teacher_config, extra_teachers=list(extra))
            self._teachers[key] = prepare_teachers(config, self.files, self.num_classes, task=DETECTION)
            self.teacher_seconds += time.perf_counter() - started
        return self._teachers[key]

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=16, collate_fn=collate_detection)
        started = time.perf_counter()
        metrics, _, images_per_second = evaluate(model, loader, self.val_set, self.frequencies)
        return {
            "metrics": {name: metrics[name] for name in STORED_METRICS},
            "per_class_ap": metrics["per_class_ap"],
            "images_per_second": images_per_second,
            "eval_seconds": time.perf_counter() - started,
        }

    def teacher_record(self) -> dict[str, Any]:
        """The shared teacher's metrics, evaluated once per teacher and stored like a run."""
        path = self.bench.output / "runs" / f"teacher__{digest(teacher_identity(self.teacher_config, []))}.json"
        record = read_record(path)
        if record is None:
            teachers, infos = self.teachers()
            experiment = self.teacher_config
            record = {"format": RECORD_FORMAT, "name": experiment.teacher.name, "seed": experiment.seed,
                      "iterations": experiment.teacher_optim.iterations, "source": infos[0], **self.evaluate(teachers[0])}  # fmt: skip
            write_json_atomic(path, record)
        return record

    def execute(self, run: Run) -> dict[str, Any]:
        """Train and evaluate one run and store its record (or its error) atomically. A run
        stopped by SIGINT/SIGTERM (or killed after a ``checkpoint_every`` checkpoint) resumes
        from the checkpoint in its work folder, which is removed once the record is stored."""
        record: dict[str, Any] = {"format": RECORD_FORMAT, "schedule": run.schedule, "recipe": run.recipe, "seed": run.seed,
                                  "iterations": run.iterations, "batch_size": run.config.data.batch_size, "key": run.key,
                                  "notes": run.notes, "error": None}  # fmt: skip
        work = run.work_dir(self.bench.output)
        try:
            teachers = self.teachers(run.config.extra_teachers)[0] if uses_teachers(run.config) else None
            if run.config.distill is not None and teachers is None:
                teachers = []  # self-distillation: the student's own EMA is the teacher
            self_teachers: list[torch.nn.Module] = []  # self-distillation: the student's EMA/snapshot teacher

            def keep_self_teacher(model: torch.nn.Module) -> None:
                if getattr(model, "self_distillation_mode", None) is not None:
                    self_teachers.append(model.teachers[0])

            student, summary = train_student(run.config, self.files, self.num_classes, teachers, work, "student", resume=True,
                                             task=DETECTION, trained=keep_self_teacher)  # fmt: skip
            record.update(self.evaluate(student))
            if self_teachers:  # is the teacher it distilled from better than the student it taught?
                record["self_teacher_metrics"] = self.evaluate(self_teachers[0])["metrics"]
            if self.bench.keep_students:
                weights = run.record_path(self.bench.output).with_suffix(".pth")
                save_checkpoint(weights, student.state_dict())
                ids = [self.val_set.label_to_category_id[label] for label in range(1, self.num_classes + 1)]
                write_categories(weights, self.val_set.categories, ids)
            record.update(train_seconds=summary["seconds"], final_losses=summary["final_losses"])
        except TrainingInterrupted:
            raise
        except Exception as error:  # a failing recipe is a result to report, not the end of the benchmark
            record["error"] = f"{type(error).__name__}: {error}"
            if record["error"] not in self._errors_seen:  # the traceback once, the message every time
                self._errors_seen.add(record["error"])
                traceback.print_exc(file=sys.stdout)
        write_json_atomic(run.record_path(self.bench.output), record)
        shutil.rmtree(work, ignore_errors=True)
        return record


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_pending(workbench: Workbench, runs: list[Run], todo: list[Run]) -> None:
    """Run ``todo`` in plan order with a progress line (run i/N, elapsed, ETA) before each. The
    ETA extrapolates the seconds per student iteration so far (evaluation included, teacher
    training left out; a teacher still to train, e.g. multi_teacher's, is not foreseen)."""
    total_iterations = sum(run.iterations for run in todo)
    done_iterations, started = 0, time.perf_counter()
    skipped = sum(1 for run in runs if run.key is not None) - len(todo)
    for index, run in enumerate(todo, start=1):
        elapsed = time.perf_counter() - started
        per_iteration = (elapsed - workbench.teacher_seconds) / max(done_iterations, 1)
        remaining = per_iteration * (total_iterations - done_iterations) if done_iterations else None
        eta = "after the first run" if remaining is None else format_duration(remaining)
        print(
            f"[run {index}/{len(todo)}] {run.schedule} schedule ({run.iterations} it), {run.recipe}, seed {run.seed}"
            f"{f' ({skipped} finished earlier)' if index == 1 and skipped else ''}; elapsed {format_duration(elapsed)}, ETA {eta}",
            flush=True,
        )
        record = workbench.execute(run)
        done_iterations += run.iterations
        if record["error"]:
            print(f"  {run.name}: {record['error']}", flush=True)
        else:
            m = record["metrics"]
            print(f"  {run.name}: AP {100 * m['AP']:.1f}, APr {100 * m['APr']:.1f}, APf {100 * m['APf']:.1f}, "
                  f"trained in {record['train_seconds']:.0f} s", flush=True)  # fmt: skip


# --- summary, table, plot ----------------------------------------------------------------
def verdict(gains: dict[str, PairedGain], errors: int) -> str:
    """"helps" / "hurts" / "no significant AP gain" from the AP gain, with the significant
    rare and frequent gains named, e.g. "no significant AP gain (APr better)"."""
    gain = gains["AP"]
    if gain.n < 2:
        return "error" if gain.n == 0 and errors else "too few seeds"
    text = {"better": "helps", "worse": "hurts"}.get(gain.verdict, "no significant AP gain")
    groups = [f"{m} {gains[m].verdict}" for m in ("APr", "APf") if gains[m].significant and gains[m].verdict != gain.verdict]
    return text + (f" ({', '.join(groups)})" if groups else "")


def summarize(records: Sequence[dict[str, Any]], schedules: Sequence[str], recipes: Sequence[str]) -> dict[str, dict[str, dict]]:
    """schedule -> recipe (baseline first) -> {seeds, errors, metrics: SeedSummary per metric,
    train_seconds, and for recipes gains: PairedGain per metric (paired with the baseline of
    the same schedule and seed) and verdict (from the AP gain)}."""
    summary: dict[str, dict[str, dict]] = {}
    for schedule in schedules:
        rows = [r for r in records if r["schedule"] == schedule]
        baseline = {r["seed"]: r["metrics"] for r in rows if r["recipe"] == BASELINE and not r["error"]}
        summary[schedule] = {}
        for recipe in [BASELINE, *recipes]:
            ok = [r for r in rows if r["recipe"] == recipe and not r["error"]]
            errors = {r["seed"]: r["error"] for r in rows if r["recipe"] == recipe and r["error"]}
            entry: dict[str, Any] = {
                "seeds": [r["seed"] for r in ok],
                "errors": errors,
                "metrics": {m: seed_summary(r["metrics"][m] for r in ok) for m in STORED_METRICS},
                "train_seconds": seed_summary(r["train_seconds"] for r in ok),
            }
            taught = [r for r in ok if "self_teacher_metrics" in r]
            if taught:  # self-distillation: its own teacher's AP at the end beside the student's
                entry["self_teacher_AP"] = seed_summary(r["self_teacher_metrics"]["AP"] for r in taught)
            if recipe != BASELINE:
                values = {m: {r["seed"]: r["metrics"][m] for r in ok} for m in STORED_METRICS}
                entry["gains"] = {m: paired_gain(values[m], {s: b[m] for s, b in baseline.items()}) for m in STORED_METRICS}
                entry["verdict"] = verdict(entry["gains"], len(errors))
            summary[schedule][recipe] = entry
    return summary


def summary_document(summary: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """The summary as JSON-ready data (dataclasses as dicts, PairedGain with ``significant``)."""

    def plain(value: Any) -> Any:
        if isinstance(value, PairedGain):
            return {**dataclasses.asdict(value), "significant": value.significant}
        if isinstance(value, SeedSummary):
            return dataclasses.asdict(value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(summary)


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _markdown(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def format_gap_closed(gain: PairedGain, gap: Optional[float]) -> str:
    """ΔAP as a share of the teacher-student AP gap, e.g. "+54 %"; "-" without a gap to close."""
    if gap is None or gap <= 0 or gain.n == 0:
        return "-"
    return f"{100 * gain.mean / gap:+.0f} %"


def best_recipe(entries: dict[str, dict]) -> Optional[str]:
    """The recipe of the largest mean ΔAP (None when none was measured)."""
    measured = {recipe: e["gains"]["AP"].mean for recipe, e in entries.items() if recipe != BASELINE and e["gains"]["AP"].n}
    return max(measured, key=measured.get) if measured else None


def markdown_table(summary: dict[str, dict[str, dict]], bench: Bench, teacher: Optional[dict[str, Any]]) -> str:
    """One markdown table per schedule: mean ± std over seeds (percent), training seconds, the
    paired gains over the baseline with their marker, and the verdict; then the legend."""
    lines: list[str] = []
    header = ["recipe", *METRICS, "train s", *(f"Δ{m}" for m in TABLE_GAINS), "gap closed", "verdict"]
    teacher_ap = (teacher or {}).get("metrics", {}).get("AP")
    for schedule, entries in summary.items():
        base = entries[BASELINE]["metrics"]["AP"]
        gap = teacher_ap - base.mean if teacher_ap is not None and base.n else None
        lines.append(f"### {schedule} schedule: students trained {bench.iterations[schedule]} iterations, "
                     f"batch {bench.batch_size}, seeds {' '.join(map(str, bench.seeds))}")  # fmt: skip
        rows = [header]
        if teacher is not None:
            one = [format_mean_std(seed_summary([teacher["metrics"][m]])) for m in METRICS]
            rows.append([f"teacher (seed {teacher['seed']}, shared)", *one, "-", *["-"] * len(TABLE_GAINS), "100 %", "reference"])
        for recipe, entry in entries.items():
            errors = entry["errors"]
            cells = [format_mean_std(entry["metrics"][m]) for m in METRICS] + [format_mean_std(entry["train_seconds"], scale=1.0, digits=0)]
            if recipe == BASELINE:
                note = "reference"
                gains = ["-"] * len(TABLE_GAINS) + ["0 %" if gap else "-"]
            else:
                note = entry["verdict"]
                gains = [format_gain(entry["gains"][m]) for m in TABLE_GAINS] + [format_gap_closed(entry["gains"]["AP"], gap)]
            if errors and not entry["seeds"]:
                note = f"error: {next(iter(errors.values()))}"
            elif errors:
                note += "; " + "; ".join(f"seed {seed} failed: {message}" for seed, message in errors.items())
            rows.append([recipe, *cells, *gains, _cell(note)])
        lines += _markdown(rows)
        if gap is not None:
            lines.append(f"\nbaseline AP {100 * base.mean:.1f} = {100 * base.mean / teacher_ap:.0f} % of the teacher's {100 * teacher_ap:.1f}.")
            best = best_recipe(entries)
            if gap <= 0:
                lines.append("The baseline is at or above the teacher's AP: there is no teacher-student gap to close.")
            elif best is not None:
                gain = entries[best]["gains"]["AP"]
                lines.append(f"Best recipe: {best}, ΔAP {format_gain(gain)}, closing {format_gap_closed(gain, gap)} of the teacher-student gap.")
        for recipe, entry in entries.items():
            if "self_teacher_AP" in entry:
                lines.append(f"{recipe}: its self-distillation teacher ends at AP {format_mean_std(entry['self_teacher_AP'])}, "
                             f"the student it taught at {format_mean_std(entry['metrics']['AP'])}.")  # fmt: skip
        lines.append("")
    lines.append(
        "AP in percent (COCO AP@[.50:.95], LVIS-style APr/APc/APf on the val split); mean ± sample std over seeds; "
        "train s: training wall-clock seconds (noisy on a shared machine). ΔX: mean over seeds of the paired "
        "difference recipe - baseline (same seed: same initial weights and batches) ± the sample std of those "
        f"differences; * marks a gain whose size exceeds {SIGNIFICANCE_FACTOR:g} x that std (decided on unrounded "
        "values), (n.s.) one that does not. gap closed: ΔAP / (teacher AP - baseline AP), the share of the "
        "teacher-student gap the recipe recovers. Verdict from ΔAP: helps / hurts (significant) or no significant "
        "AP gain; significant APr/APf gains that differ from it are named."
    )
    return "\n".join(lines)


def per_class_values(records: Sequence[dict[str, Any]], schedule: str, recipe: str) -> dict[int, dict[int, float]]:
    """category id -> {seed: AP} of one (schedule, recipe) over its finished runs."""
    values: dict[int, dict[int, float]] = {}
    for record in records:
        if record["schedule"] == schedule and record["recipe"] == recipe and not record["error"]:
            for category, ap in record["per_class_ap"].items():
                values.setdefault(int(category), {})[record["seed"]] = ap
    return values


def per_class_table(records: Sequence[dict[str, Any]], bench: Bench, categories: list[tuple[int, str, int]],
                    teacher: Optional[dict[str, Any]]) -> str:  # fmt: skip
    """Per schedule, AP per category (most training images first): the teacher, the baseline's
    mean ± std over seeds, and each recipe's paired gain over it, so the tail classes can be
    read by name beside the frequent ones."""
    lines = []
    for schedule, iterations in bench.iterations.items():
        baseline = per_class_values(records, schedule, BASELINE)
        recipes = {recipe: per_class_values(records, schedule, recipe) for recipe in bench.recipes}
        lines.append(f"### AP per category, {schedule} schedule ({iterations} iterations)")
        rows = [["category (training images)", "teacher", "baseline", *(f"Δ {recipe}" for recipe in recipes)]]
        for category, name, images in categories:
            teacher_ap = (teacher or {}).get("per_class_ap", {}).get(str(category), (teacher or {}).get("per_class_ap", {}).get(category))
            teacher_cell = "-" if teacher_ap is None else format_mean_std(seed_summary([teacher_ap]))
            base = baseline.get(category, {})
            gains = [format_gain(paired_gain(values.get(category, {}), base)) for values in recipes.values()]
            rows.append([f"{name} ({images})", teacher_cell, format_mean_std(seed_summary(base.values())), *gains])
        lines += _markdown(rows) + [""]
    lines.append("AP in percent on the val split; baseline: mean ± std over seeds; Δ: paired gain over the baseline "
                 f"(* beyond {SIGNIFICANCE_FACTOR:g} std of the per-seed differences).")  # fmt: skip
    return "\n".join(lines)


def plot_per_class(records: Sequence[dict[str, Any]], bench: Bench, categories: list[tuple[int, str, int]],
                   teacher: Optional[dict[str, Any]], path: Path) -> Path:  # fmt: skip
    """Mean AP per category over seeds for the teacher, the baseline and each recipe, longest schedule."""
    schedule = max(bench.iterations, key=bench.iterations.get)
    models: dict[str, dict[int, float]] = {}
    if teacher is not None:
        models["teacher"] = {int(c): ap for c, ap in teacher["per_class_ap"].items()}
    for recipe in [BASELINE, *bench.recipes]:
        values = per_class_values(records, schedule, recipe)
        models[recipe] = {c: seed_summary(v.values()).mean for c, v in values.items() if v}
    return plot_per_class_ap(
        models, {c: name for c, name, _ in categories}, {c: n for c, _, n in categories}, path,
        title=f"AP per category, mean of {len(bench.seeds)} seeds, students trained {bench.iterations[schedule]} iterations",
    )  # fmt: skip


def plot(summary: dict[str, dict[str, dict]], path: Path, bench: Bench) -> Path:
    gains = {
        f"{schedule} ({bench.iterations[schedule]} it)": {recipe: e["gains"] for recipe, e in entries.items() if recipe != BASELINE}
        for schedule, entries in summary.items()
    }
    title = f"Gain over the baseline, mean ± std of {len(bench.seeds)} paired seeds (* > {SIGNIFICANCE_FACTOR:g} std)"
    return plot_gains(gains, PLOT_GAINS, path, title=title)


# --- the command -------------------------------------------------------------------------
def run(args: argparse.Namespace, stdout) -> int:
    bench = resolve_bench(args)
    output = bench.output
    output.mkdir(parents=True, exist_ok=True)
    teachers = teacher_config(bench)
    files = data_files(teachers)
    runs = plan_runs(bench, files, teachers)
    todo = pending_runs(runs, output, args.retry_errors)
    mode = "QUICK smoke run: tiny data and budgets, expect little or no signal" if bench.quick else "benchmark"
    print(
        f"densekd bench_recipes ({mode}): {len(bench.recipes)} recipes + baseline, seeds {' '.join(map(str, bench.seeds))}, "
        + ", ".join(f"{s} {n} it" for s, n in bench.iterations.items())
        + f", batch {bench.batch_size}, {args.threads} threads; {len(runs)} runs, {len(runs) - len(todo)} done or not buildable, "
        f"{len(todo)} to train; results in {output}",
        flush=True,
    )
    for note in dict.fromkeys(note for run_ in runs for note in run_.notes):
        print(f"note: {note}", flush=True)
    workbench = Workbench(bench, files, teachers)
    train_pending(workbench, runs, todo)
    try:
        teacher: Optional[dict[str, Any]] = workbench.teacher_record()
    except Exception as error:  # the reference row is missing, the results stand
        print(f"bench_recipes: could not evaluate the teacher ({type(error).__name__}: {error}); table without it", flush=True)
        teacher = None

    records = collect_records(runs, output)
    summary = summarize(records, list(bench.iterations), bench.recipes)
    table = markdown_table(summary, bench, teacher)
    (output / "results.md").write_text(table + "\n")
    plot(summary, output / "gains.png", bench)
    per_class = per_class_table(records, bench, workbench.categories(), teacher)
    (output / "per_class.md").write_text(per_class + "\n")
    plot_per_class(records, bench, workbench.categories(), teacher, output / "per_class_ap.png")
    document = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": {"config": str(bench.config_path), "recipes": bench.recipes, "seeds": bench.seeds,
                     "iterations": bench.iterations, "batch_size": bench.batch_size,
                     "overrides": [*bench.quick_overrides, *bench.user_overrides],
                     "quick": bench.quick, "threads": args.threads},  # fmt: skip
        "significance_rule": (
            f"paired by seed; gain = mean(recipe - baseline); significant when |gain| > {SIGNIFICANCE_FACTOR:g} x the "
            "sample std (ddof=1) of the per-seed differences, with at least 2 paired seeds"
        ),
        "teacher": teacher,
        "runs": records,
        "summary": summary_document(summary),
        "table": table,
        "per_class_table": per_class,
    }
    write_json_atomic(output / "results.json", document)
    print("\n" + table, flush=True)
    print(f"\nwrote {output}/results.md, gains.png, per_class.md, per_class_ap.png, results.json, runs/", flush=True)
    if args.json:
        stdout.write(json.dumps(jsonable(document), indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stdout = sys.stdout
    # --json: stdout carries the document only; progress and the table go to stderr.
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        try:
            return run(args, stdout)
        except (ConfigError, FileNotFoundError) as error:
            print(f"bench_recipes: {error}", file=sys.stderr)
            return 2
        except TrainingInterrupted as interrupted:
            print(f"bench_recipes: {interrupted} Finished runs are stored; run the same command again to continue.", file=sys.stderr)
            return interrupted.exit_code
        except KeyboardInterrupt:
            print("bench_recipes: interrupted; finished runs are stored, run the same command again to continue.", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
