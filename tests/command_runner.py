"""Runs many command lines as processes of their own, each forked from this one after the
commands' modules are imported once (tests/test_preflight.py: 50 refusals in seconds, not minutes).

    python command_runner.py OUT < cases.json    # [[module, [args...]], ...], run in the cwd

Each child is ``python -m module args...`` as the interpreter runs it (``runpy``, ``__main__``):
its stdout and stderr go to ``OUT/<i>.out`` / ``OUT/<i>.err``, an uncaught exception prints its
traceback, and its exit status is written to ``OUT/status.json`` (one per case, in order).
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
import warnings


def child(module: str, args: list[str], out: str, i: int) -> int:
    for fd, suffix in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{out}/{i}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def main() -> None:
    out, cases = sys.argv[1], json.load(sys.stdin)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")  # the modules imported below
    import medix_fast.eval.cli  # noqa: F401 - the commands and their heavy imports, once, before the forks
    import medix_fast.eval.medix_r1  # noqa: F401
    import medix_fast.export  # noqa: F401
    import medix_fast.generate.memory  # noqa: F401
    import medix_fast.train  # noqa: F401
    import medix_fast.trainer  # noqa: F401

    statuses = []
    for i, (module, args) in enumerate(cases):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = child(module, args, out, i)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    with open(f"{out}/status.json", "w") as f:
        json.dump(statuses, f)


if __name__ == "__main__":
    main()
