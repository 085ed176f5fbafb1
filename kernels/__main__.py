"""``python -m medix_fast.kernels``: which kernel back-ends are active here; with ``--compile-check``
every Triton kernel compiled for sm_80 and sm_90 (or ``--arch``) without a GPU and checked
(``compile_check.py``; exit status 1 on a problem)."""
import argparse
import os
import sys

import torch

from .dispatch import active_backends, requested_backend


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medix_fast.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--compile-check", action="store_true", help="compile every Triton kernel for --arch and check it")
    p.add_argument("--arch", type=int, nargs="+", choices=(80, 90, 100), default=[80, 90],
                   help="compute capabilities (default: 80 90)")
    p.add_argument("--select", default="", help="only the launches whose label contains this")
    args = p.parse_args(argv)
    if not args.compile_check:
        print(f"torch {torch.__version__}; requested backend: {requested_backend()}")
        for name, ok in active_backends().items():
            print(f"  {name:7s} {'active' if ok else 'unavailable'}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels were made interpreted at import: start again
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "medix_fast.kernels", *sys.argv[1:]], env)
    from .compile_check import main as check
    return check(args.arch, args.select)


if __name__ == "__main__":
    raise SystemExit(main())
