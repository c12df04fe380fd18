"""How large each distillation term is against the student's own loss, read from a training log.

    python tools/term_balance.py runs/train_det/distilled.jsonl
    python tools/term_balance.py runs/train_det/distilled.jsonl --every 100

Every phase of ``tools/train_det.py`` / ``train_seg.py`` writes ``<output>/<phase>.jsonl``: one
record per ``log_every`` steps with the window's mean losses (the student's own, and each
``kd_<term>`` as added to the loss, i.e. weighted) and, for the last step, each term's unscaled
value and the weight applied to it. This prints, per record, the student's loss and each term's
share of it (weighted term / student loss), then a verdict per term over the second half of the
run: a term far above the student's loss dominates the gradient, one far below it does next to
nothing. ``Term(..., balance=r)`` (YAML ``balance: r``) scales a term to r times the student's loss.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

DOMINATES = 5.0  # a term above 5x the student's loss drowns the detection losses' gradient
NEGLIGIBLE = 0.02  # below 2 % of it, the term barely moves the student


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a <phase>.jsonl of a training output folder.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number} is not a JSON record; is this a densekd training log?") from None
        if "losses" not in record or "iteration" not in record:
            raise ValueError(f"{path}:{number} has no 'iteration'/'losses'; is this a densekd training log?")
        records.append(record)
    return records


def student_loss(losses: dict[str, float]) -> float:
    """The student's own loss: every entry but the kd terms and the total ('loss')."""
    return sum(value for name, value in losses.items() if not name.startswith("kd_") and name != "loss")


def shares(record: dict) -> dict[str, float]:
    """kd term -> weighted term / student loss, for one record."""
    own = student_loss(record["losses"])
    return {name: value / own for name, value in record["losses"].items() if name.startswith("kd_") and own > 0}


def verdict(share: float) -> str:
    if share > DOMINATES:
        return f"dominates (> {DOMINATES:g}x the student's loss): lower its weight or set balance"
    if share < NEGLIGIBLE:
        return f"negligible (< {NEGLIGIBLE:g}x): raise its weight or set balance"
    return "balanced"


def report(records: list[dict], every: int) -> str:
    terms = sorted({name for record in records for name in shares(record)})
    if not terms:
        return "no kd_ terms in this log (a teacher or baseline phase, or distillation still in warm-up)"
    lines = [f"{'iter':>6}  {'student':>8}  " + "  ".join(f"{name:>24}" for name in terms)]
    for record in records:
        if record["iteration"] % every and record is not records[-1]:
            continue
        share = shares(record)
        last = record.get("kd_terms_last_step", {})
        cells = []
        for name in terms:
            detail = f" (w {last[name]['weight']:.3g})" if name in last else ""
            cells.append(f"{share.get(name, float('nan')):>10.3f}x{detail:>13}")
        lines.append(f"{record['iteration']:>6}  {student_loss(record['losses']):>8.4f}  " + "  ".join(cells))
    late = records[len(records) // 2 :]
    lines.append("\nshare of the student's loss over the second half of the run (median):")
    for name in terms:
        values = [shares(record)[name] for record in late if name in shares(record)]
        median = statistics.median(values) if values else float("nan")
        lines.append(f"  {name}: {median:.3f}x  {verdict(median)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="a <phase>.jsonl training log")
    parser.add_argument("--every", type=int, default=1, help="print every N-th iteration's record (default: all)")
    args = parser.parse_args(argv)
    try:
        print(report(read_records(args.log), max(args.every, 1)))
    except (FileNotFoundError, ValueError) as error:
        print(f"term_balance: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
