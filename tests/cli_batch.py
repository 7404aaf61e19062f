"""Run the CLI once per argv inside one process, as ``python -m raytrain_ft.cli ARGV`` would.

Tests of many bad inputs pay the interpreter and torch import once instead of
once per case. Each case gets its own captured stdout/stderr (and a fresh
logging handler bound to them), its return code or ``SystemExit`` code, any
traceback an uncaught exception would print, and the Ray sessions that exist
under ``$RAY_TMPDIR`` after it (none may: bad input must fail before Ray
starts).

    python -m tests.cli_batch < cases.json > results.json
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import traceback


def ray_sessions(ray_dir: str) -> list[str]:
    """The Ray sessions started under ``ray_dir`` (``$RAY_TMPDIR``): Ray makes them in its ``ray``
    folder there (``$RAY_TMPDIR/ray/session_...``)."""
    found = []
    for d in (ray_dir, os.path.join(ray_dir, "ray")):
        if os.path.isdir(d):
            found += [os.path.join(d, p) for p in os.listdir(d) if p.startswith("session")]
    return sorted(found)


def run(cases: list[list[str]], ray_dir: str) -> list[dict]:
    from raytrain_ft.cli import main

    results = []
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        logging.root.handlers.clear()  # main's basicConfig binds a new handler to this case's err
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        results.append(
            {
                "argv": argv,
                "returncode": code,
                "stdout": out.getvalue(),
                "stderr": err.getvalue(),
                "ray_sessions": ray_sessions(ray_dir),
            }
        )
    return results


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin), os.environ["RAY_TMPDIR"]), sys.stdout)
