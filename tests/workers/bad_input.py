"""Runs many ``nemo-minitron`` command lines in one process (they share the imports), as a user would run
them one by one: ``python bad_input.py CASES.json RESULTS.json``. Each case's stdout, stderr and exit status
are recorded; a case never sees the previous one's output."""

import contextlib
import io
import json
import os
import sys


def main() -> None:
    from nemo_minitron import cli

    cases = json.loads(open(sys.argv[1]).read())
    results = {}
    for case in cases:
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(case["argv"])
        except SystemExit as e:  # a command that exits itself is a finding too
            rc = f"SystemExit({e.code})"
        finally:
            os.chdir(cwd)
        results[case["id"]] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
        print(f"{case['id']}: {rc}", file=sys.__stderr__, flush=True)
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
