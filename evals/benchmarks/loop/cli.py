"""``visionroute bench loop``: its arguments, the run, the files it writes."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evals.benchmarks.loop.config import LoopConfig
from evals.benchmarks.loop.replay import REPLAYS, load_replay
from evals.benchmarks.loop.report import format_result, plot
from evals.benchmarks.loop.simulate import simulate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoopConfig()
    parser.add_argument(
        "--task",
        choices=sorted(REPLAYS),
        default="digits",
        help="whose tiers' outputs the stream replays (textures: the second task, its LLaVA as the second tier)",
    )
    parser.add_argument("--corruption", default="gaussian_noise", help="evals.corruptions name that ramps up")
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument(
        "--window", type=int, default=d.window, help="items per window (recertified after each)"
    )
    parser.add_argument(
        "--shift-start", type=float, default=d.shift_start, help="share of the stream before the shift"
    )
    parser.add_argument("--ramp", type=float, default=d.ramp, help="share of the stream the ramp takes")
    parser.add_argument("--max-severity", type=int, default=d.max_severity)
    parser.add_argument("--alpha", type=float, default=d.alpha)
    parser.add_argument("--delta", type=float, default=d.delta)
    parser.add_argument("--reviewer-error", type=float, default=d.reviewer_error)
    parser.add_argument("--nonresponse", type=float, default=d.nonresponse, help="audits never labelled")
    parser.add_argument("--audit-fraction", type=float, default=None, help="default: the label plan's")
    parser.add_argument(
        "--audit-budget", type=float, default=d.audit_budget, help="the largest audit fraction"
    )
    parser.add_argument("--label-windows", type=int, default=d.label_windows)
    parser.add_argument(
        "--no-keep-incumbent",
        action="store_true",
        help="deploy every new certificate (default: keep a running plan that is still certified and no dearer)",
    )
    parser.add_argument(
        "--no-replan",
        action="store_true",
        help="keep the clean pilot's audit fraction after a shift (default: the label plan again on the shifted labels)",
    )
    parser.add_argument(
        "--alarm-check-every",
        type=int,
        default=d.alarm_check_every,
        help="the loop checks its drift alarm on a window's running count every this many items and sends "
        "the rest of the window's flagged items to review once it fires (--window: at the window's end only)",
    )
    parser.add_argument(
        "--fit-share",
        type=float,
        default=d.fit_share,
        help="share of a label window that places the candidates (0: the service's 10%%, at most 200)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the stream, reviewers, audit coins and splits")
    parser.add_argument(
        "--replay-seed",
        type=int,
        default=None,
        help="the split and trained tiers the recorded outputs come from (default: --seed); reusing one "
        "skips the tier replay (minutes) for a new --seed",
    )
    parser.add_argument(
        "--out-dir", default=None, help="loop.json and loop.png (default: data dir/bench-loop)"
    )


def register(bench) -> None:
    parser = bench.add_parser(
        "loop", help="the closed loop under a mid-stream shift: cost/1000, accepted error, labels, per phase"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visionroute import paths

    config = LoopConfig(
        items=args.items,
        window=args.window,
        shift_start=args.shift_start,
        ramp=args.ramp,
        max_severity=args.max_severity,
        alpha=args.alpha,
        delta=args.delta,
        reviewer_error=args.reviewer_error,
        nonresponse=args.nonresponse,
        audit_fraction=args.audit_fraction,
        audit_budget=args.audit_budget,
        label_windows=args.label_windows,
        keep_cheaper_incumbent=not args.no_keep_incumbent,
        replan_after_shift=not args.no_replan,
        fit_share=args.fit_share or None,
        alarm_check_every=args.alarm_check_every,
        seed=args.seed,
    )
    started = time.perf_counter()
    replay_seed = args.seed if args.replay_seed is None else args.replay_seed
    replay = load_replay(
        args.task, args.corruption, seed=replay_seed, progress=lambda line: print(line, flush=True)
    )
    replayed = time.perf_counter() - started
    result = simulate(replay, config, progress=lambda line: print(line, flush=True))
    result["replay_seconds"] = round(replayed, 1)
    result["replay_seed"] = replay_seed
    out = Path(args.out_dir or paths.data_dir() / "bench-loop")
    out.mkdir(parents=True, exist_ok=True)
    stem = "loop" if args.task == "digits" else f"loop-{args.task}"
    result["plot"] = str(plot(result, out / f"{stem}.png"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    print(format_result(result))
    print(
        f"replay (tiers on every item and severity, cached) {replayed:.1f} s; plot {result['plot']}; JSON {out / f'{stem}.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the closed loop under a mid-stream shift (issue 23)")
    add_arguments(parser)
    return run(parser.parse_args(argv))
