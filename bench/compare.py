#!/usr/bin/env python3
"""One bench, two trees, alternating rounds: is the candidate more than N% worse?

A single run of a throughput or latency bench on a shared 2-core machine
varies by more than the 5% an issue allows a change to cost, so one run of
"before" and one of "after" settles nothing. This runs the named bench from
a baseline checkout and from a candidate checkout in alternation (base,
cand, base, cand, ... so that drift in the machine's load hits both alike),
each tree's own bench script against its own code and virtualenv, collects
the JSON line each run ends with, and compares every numeric figure by its
median over the rounds.

For each figure it prints the two medians, the change, whether that change
is worse (higher-is-better or lower-is-better is read from the figure's
name; `--lower` / `--higher` override), and the baseline's own spread (the
median absolute deviation of its rounds, in % of its median): a difference
smaller than that spread is not a measured change. `--figures REGEX` picks
the figures the verdict is about; `met` is true when none of them is worse
than `--max-worse` percent by the medians.

    python bench/compare.py --base /tmp/old --cand . --rounds 4 --cpus 1 capture -- --quick
    python bench/compare.py --base /tmp/old --cand . --figures 'gbps|rtt' backends -- --quick

`--ratio NAME=NUM/DEN` adds a figure to every run: one figure divided by
another of the same run, e.g. ambit's CPU per round trip over Envoy's. The
anchor (Envoy here) runs the same binary in both trees, so the ratio cancels
the machine's drift between rounds, which a shared VM's absolute CPU figures
do not. `--replay LOG` recomputes the table from an earlier comparison's log
(with other `--figures` or `--ratio`) without running anything.

Ends with one JSON line. The baseline tree must have run `make setup`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from stats import percentile


def median(values: Iterable[float]) -> float:
    """The 50th percentile, from the one helper every bench shares."""
    return percentile(list(values), 50)

# Read from a figure's name: which way is better. Checked in order; the first match wins.
_LOWER_IS_BETTER = re.compile(r"(_us|_ms|rtt|latency|cpu|_mb|_kib|rss|pss|seconds|duration|failed|errors|reset)", re.I)
_HIGHER_IS_BETTER = re.compile(r"(gbps|per_s|conn_s|rate|_vs_|ratio|throughput|ops)", re.I)
# Figures that describe the run, not the code under test.
_NOT_A_FIGURE = re.compile(r"(^|\.)([^.]*target[^.]*|cpus|pods|sizes|quick|seconds_run|rounds)$", re.I)


def flatten(value: object, prefix: str = "") -> dict[str, float]:
    """Every number in a bench's JSON report, under a dotted path. A list of
    objects that carry a `pods` or `backend`/`path` field is keyed by those
    (stable across trees); other lists by position."""
    out: dict[str, float] = {}
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            label = str(index)
            if isinstance(item, dict):
                parts = [str(item[k]) for k in ("backend", "path", "pods") if k in item]
                label = "/".join(parts) or label
            out.update(flatten(item, f"{prefix}[{label}]"))
    return out


def better_direction(name: str, lower: re.Pattern | None, higher: re.Pattern | None) -> str | None:
    """'lower' or 'higher' is better for this figure, or None when the name does not say.
    The last part of the name that says decides (`rtt_us.ambit.p50`: `rtt_us`)."""
    if lower and lower.search(name):
        return "lower"
    if higher and higher.search(name):
        return "higher"
    for part in reversed(name.split(".")):
        if _LOWER_IS_BETTER.search(part):
            return "lower"
        if _HIGHER_IS_BETTER.search(part):
            return "higher"
    return None


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def tree_rev(path: Path) -> str:
    """The checkout's commit (short), or its path if it is not a git tree."""
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or str(path)


def run_once(tree: Path, bench: str, args: list[str], timeout: float, log, cpus: str | None = None) -> dict:
    python = tree / ".venv" / "bin" / "python"
    script = tree / "bench" / f"{bench}.py"
    if not python.exists() or not script.exists():
        raise SystemExit(f"compare: {tree} has no {python.relative_to(tree)} or {script.relative_to(tree)}"
                         " (run `make setup` there, or pick a bench that tree has)")
    started = time.monotonic()
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = subprocess.run([*pin, str(python), str(script), *args], cwd=tree, capture_output=True, text=True,
                          timeout=timeout)
    log.write(f"=== {tree} {bench} {' '.join(args)} cpus={cpus or 'all'} rc={proc.returncode} {time.monotonic() - started:.1f}s"
              f" rev={tree_rev(tree)}\n")
    log.write(proc.stdout[-20000:])
    log.write(proc.stderr[-5000:])
    log.flush()
    report = last_json_line(proc.stdout)
    if proc.returncode != 0 or report is None:
        raise BenchFailed(f"{bench} in {tree} failed (rc {proc.returncode}, "
                          f"{'no' if report is None else 'a'} JSON line); see {log.name}")
    return report


class BenchFailed(Exception):
    """One run of a bench ended without its report."""


def run_with_retries(tree: Path, bench: str, args: list[str], timeout: float, log, cpus: str | None,
                     budget: list[int]) -> dict:
    """run_once, again while `budget[0]` (shared by the whole comparison) allows."""
    while True:
        try:
            return run_once(tree, bench, args, timeout, log, cpus)
        except BenchFailed as exc:
            if budget[0] <= 0:
                raise SystemExit(f"compare: {exc}") from None
            budget[0] -= 1
            print(f"compare: {exc}; running it again", file=sys.stderr, flush=True)


def add_ratios(run: dict[str, float], ratios: list[tuple[str, str, str]]) -> dict[str, float]:
    """The run with each NAME = NUM / DEN it has both parts of (a zero denominator gives nothing)."""
    for name, num, den in ratios:
        if num in run and den in run and run[den] != 0:
            run[name] = round(run[num] / run[den], 4)
    return run


def parse_ratio(text: str) -> tuple[str, str, str]:
    """`NAME=NUM/DEN` (flattened figure names, as the table prints them)."""
    name, sep, rest = text.partition("=")
    num, sep2, den = rest.partition("/")
    if not (sep and sep2 and name and num and den):
        raise argparse.ArgumentTypeError(f"--ratio wants NAME=NUMERATOR/DENOMINATOR, not {text!r}")
    return name, num, den


def replay(log_text: str) -> tuple[Path, Path, list[dict], list[dict], dict[Path, str]]:
    """The two trees and their runs' reports, in order, from a comparison's log.

    Each run's section starts with a `=== TREE ...` line; its report is the
    section's last JSON line with a "bench" key (a failed run has none)."""
    trees: list[Path] = []
    runs: dict[Path, list[dict]] = {}
    sections: list[tuple[Path, list[str]]] = []
    revs: dict[Path, str] = {}
    for line in log_text.splitlines():
        if line.startswith("=== "):
            sections.append((Path(line.split()[1]), []))
            recorded = re.search(r" rev=(\S+)", line)
            if recorded:  # logs from before the header named the commit do not say
                revs[sections[-1][0]] = recorded.group(1)
        elif sections:
            sections[-1][1].append(line)
    for tree, lines in sections:
        if tree not in runs:
            trees.append(tree)
            runs[tree] = []
        report = last_json_line("\n".join(lines))
        if report is not None and "bench" in report:
            runs[tree].append(report)
    if len(trees) != 2:
        raise SystemExit(f"compare: the log names {len(trees)} trees, not 2")
    return trees[0], trees[1], runs[trees[0]], runs[trees[1]], revs  # the first round runs the base first


def compare(base_runs: list[dict[str, float]], cand_runs: list[dict[str, float]], figures: re.Pattern | None,
            lower: re.Pattern | None, higher: re.Pattern | None, max_worse: float) -> dict[str, dict]:
    """Per figure: medians, change, worse-by, the baseline's spread, and whether it counts for the verdict."""
    names = sorted(set.intersection(*(set(r) for r in base_runs + cand_runs)))
    table: dict[str, dict] = {}
    for name in names:
        if _NOT_A_FIGURE.search(name):
            continue
        direction = better_direction(name, lower, higher)
        base = [r[name] for r in base_runs]
        cand = [r[name] for r in cand_runs]
        base_median, cand_median = median(base), median(cand)
        if base_median == 0:
            continue
        change = (cand_median - base_median) / abs(base_median) * 100
        worse = {"lower": change, "higher": -change}.get(direction) if direction else None
        spread = median(abs(v - base_median) for v in base) / abs(base_median) * 100
        judged = direction is not None and (figures is None or bool(figures.search(name)))
        table[name] = {
            "base_median": round(base_median, 4), "cand_median": round(cand_median, 4),
            "base_range": [round(min(base), 4), round(max(base), 4)],
            "cand_range": [round(min(cand), 4), round(max(cand), 4)],
            "change_pct": round(change, 1), "better": direction,
            "worse_pct": None if worse is None else round(worse, 1),
            "base_spread_pct": round(spread, 1), "judged": judged,
            "ok": None if not judged else worse <= max_worse,
        }
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--base", type=Path, help="baseline checkout (with its .venv); required unless --replay")
    parser.add_argument("--cand", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="candidate checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating (default 3)")
    parser.add_argument("--figures", type=re.compile, help="regex: the figures the verdict is about (default all)")
    parser.add_argument("--lower", type=re.compile, help="regex: figures where lower is better (overrides names)")
    parser.add_argument("--higher", type=re.compile, help="regex: figures where higher is better")
    parser.add_argument("--max-worse", type=float, default=5.0, help="percent a judged figure may be worse")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one bench run may take")
    parser.add_argument("--cpus", help="run each bench pinned to these CPUs (taskset list, e.g. 1): every process"
                        " it starts inherits them, so the path under test shares one CPU and cross-CPU wake-ups"
                        " stop dominating small round-trip times")
    parser.add_argument("--retries", type=int, default=1,
                        help="runs of a tree that may fail (no JSON line) and be run again (default 1): an old"
                        " tree's bench may have a harness flake fixed since")
    parser.add_argument("--log", type=Path, help="where every run's output goes (default /tmp/compare-BENCH-TIME.log)")
    parser.add_argument("--ratio", type=parse_ratio, action="append", default=[], metavar="NAME=NUM/DEN",
                        help="add figure NAME = NUM / DEN to every run (repeatable); see above")
    parser.add_argument("--replay", type=Path, metavar="LOG",
                        help="recompute from an earlier comparison's log instead of running (--base is then unused)")
    parser.add_argument("bench", help="bench name: bench/NAME.py in both trees")
    parser.add_argument("args", nargs="*", help="arguments for the bench (after --)")
    opts = parser.parse_args()
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    retries = [opts.retries]
    if opts.replay:
        base_tree, cand_tree, base_reports, cand_reports, revs = replay(opts.replay.read_text())
        log_path = opts.replay
        base_runs = [add_ratios(flatten(r), opts.ratio) for r in base_reports]
        cand_runs = [add_ratios(flatten(r), opts.ratio) for r in cand_reports]
        if not base_runs or not cand_runs:
            raise SystemExit(f"compare: {opts.replay} holds no finished run of one of the trees")
    else:
        if opts.base is None:
            parser.error("--base is required (or --replay LOG)")
        base_tree, cand_tree = opts.base.resolve(), opts.cand.resolve()
        revs = {}
        log_path = opts.log or Path(f"/tmp/compare-{opts.bench}-{time.strftime('%H%M%S')}.log")
        base_runs = []
        cand_runs = []
        with open(log_path, "w") as log:
            for round_no in range(opts.rounds):
                # Alternate which tree goes first, so neither always runs on a warmer machine.
                order = [(base_tree, base_runs), (cand_tree, cand_runs)]
                for tree, runs in (order if round_no % 2 == 0 else order[::-1]):
                    report = run_with_retries(tree, opts.bench, opts.args, opts.timeout, log, opts.cpus, retries)
                    runs.append(add_ratios(flatten(report), opts.ratio))
                    print(f"round {round_no + 1}/{opts.rounds}: {tree.name} done", file=sys.stderr, flush=True)
    table = compare(base_runs, cand_runs, opts.figures, opts.lower, opts.higher, opts.max_worse)

    def rev(path: Path) -> str:
        return revs.get(path) or tree_rev(path)

    width = max((len(n) for n in table), default=10)
    rounds = min(len(base_runs), len(cand_runs))
    print(f"{opts.bench}: base {rev(base_tree)} vs cand {rev(cand_tree)}, {rounds} rounds each, medians,"
          f" CPUs {opts.cpus or 'all'}")
    print(f"{'figure':<{width}}  {'base':>10}  {'cand':>10}  {'change':>7}  {'worse':>6}  {'base spread':>11}")
    for name, row in table.items():
        worse = "" if row["worse_pct"] is None else f"{row['worse_pct']:+.1f}%"
        mark = {True: "", False: "  <-- worse than allowed", None: ""}[row["ok"]]
        print(f"{name:<{width}}  {row['base_median']:>10.4g}  {row['cand_median']:>10.4g}  "
              f"{row['change_pct']:>+6.1f}%  {worse:>6}  {row['base_spread_pct']:>10.1f}%{mark}")
    judged = {n: r for n, r in table.items() if r["judged"]}
    worst = max(judged.values(), key=lambda r: r["worse_pct"], default=None)
    print(json.dumps({
        "bench": "compare", "of": opts.bench, "args": opts.args, "rounds": rounds, "cpus": opts.cpus or "all",
        "failed_runs_rerun": opts.retries - retries[0],
        "base": rev(base_tree), "cand": rev(cand_tree), "log": str(log_path),
        "figures": table,
        "worst_worse_pct": None if worst is None else worst["worse_pct"],
        "p90_base_spread_pct": round(percentile([r["base_spread_pct"] for r in judged.values()], 90), 1)
        if judged else None,
        "target_max_worse_pct": opts.max_worse,
        "met": bool(judged) and all(r["ok"] for r in judged.values()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
