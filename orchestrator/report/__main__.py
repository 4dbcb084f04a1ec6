"""``python -m orchestrator.report EXPERIMENT_DIR [--out DIR]``: rewrite an experiment's report."""
from __future__ import annotations

import argparse
import sys

from dmkd.errors import UserError, exit_process, one_line
from orchestrator.report import __doc__ as DESCRIPTION
from orchestrator.report.publish import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="an experiment folder written by a sweep or an ablation")
    parser.add_argument("--out", help="where to write the report (default: the experiment folder)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.experiment, args.out)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    exit_process(main())
