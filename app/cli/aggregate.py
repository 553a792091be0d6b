"""``tessera aggregate``: offline consensus of a vote file, or of several masks of one object.

Parsed with ``argparse``, not typer, and dispatched by ``app.cli.main`` before typer is
imported: typer builds pydantic adapters for every parameter before a command runs (about
0.2 s), and this command is called once per object by scripts that fuse thousands of them. The
typer app registers a command of the same name that forwards here, so ``tessera --help`` lists
it and ``tessera --data-dir D aggregate ...`` works too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2  # the same as app.cli.common's
DESCRIPTION = (
    "Aggregate a file of votes offline (posteriors per item, credibility per worker), or fuse "
    "several annotators' masks of one object into one."
)


def say(line: str) -> None:
    """One line of the command's report on standard output."""
    sys.stdout.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera aggregate", description=DESCRIPTION)
    p.add_argument("votes", type=Path, help="CSV worker,task,label or NPZ votes/masks")
    p.add_argument("--out", type=Path, required=True, help="output .csv or .npz")
    p.add_argument("--gold", type=Path, help="CSV task,label or NPZ gold")
    p.add_argument("--prior", type=Path, help="CSV task,prior or NPZ prior")
    p.add_argument(
        "--method",
        help="votes: majority_vote, weighted_majority or dawid_skene (default); "
        "masks: consensus (default), majority_vote or staple",
    )
    p.add_argument("--image", type=Path, help="masks: the image they were drawn on (PNG, JPEG)")
    p.add_argument(
        "--truth", type=Path, help="masks: an expert mask (PNG or NPZ 'truth') to report IoU, ECE"
    )
    return p


def run(argv: list[str]) -> int:
    """Run the command on ``argv`` (the arguments after ``aggregate``); return the exit code."""
    args = build_parser().parse_args(argv)  # exits with 2 and a usage line on bad arguments
    from ml.aggregation.io import AggregationInputError, aggregate_file

    try:
        s = aggregate_file(
            args.votes,
            out=args.out,
            gold=args.gold,
            prior=args.prior,
            method=args.method,
            image=args.image,
            truth=args.truth,
        )
    except (AggregationInputError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        sys.stderr.write(f"error: {message}\n")
        return EXIT_BAD_INPUT
    if s.dense:
        extra = ", the border redrawn from the image" if s.image_used else ""
        if s.set_aside:
            extra += f", {s.set_aside} annotator(s) set aside (another object)"
        say(f"{s.method}: {s.n_workers} masks of {s.n_items:,} pixels{extra} -> {s.out}")
        if s.iou is not None:
            say(
                f"against the truth: IoU {s.iou:.4f}; calibration on the {s.n_disputed:,} "
                f"disputed pixels: ECE {s.ece_disputed:.4f}"
            )
        return 0
    say(
        f"{s.method}: {s.n_votes:,} votes by {s.n_workers:,} workers on {s.n_items:,} items "
        f"({s.n_gold:,} gold), {s.iterations} iterations"
        f"{'' if s.converged else ' (not converged)'} -> {s.out}"
    )
    return 0
