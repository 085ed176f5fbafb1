"""``python -m medix_fast.kernels``: which kernel back-ends are active here; with ``--compile-check``
every Triton kernel compiled for sm_80 and sm_90 (or ``--arch``) without a GPU and checked
(``compile_check.py``; exit status 1 on a problem). The decode kernel is compiled at the shapes that
``--decode-shapes MODULE:FUNCTION`` returns (the kernels know no model; the default is the engine's
shipped configs, ``""`` skips it). torch is imported after the arguments are read."""
import argparse
import importlib
import os
import sys

DECODE_SHAPES = "medix_fast.generate.decode_shapes:shipped"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medix_fast.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--compile-check", action="store_true", help="compile every Triton kernel for --arch and check it")
    p.add_argument("--arch", type=int, nargs="+", choices=(80, 90, 100), default=[80, 90],
                   help="compute capabilities (default: 80 90)")
    p.add_argument("--select", default="", help="only the launches whose label contains this")
    p.add_argument("--decode-shapes", default=DECODE_SHAPES, metavar="MODULE:FUNCTION",
                   help=f"a function returning the decode shapes to compile the decode kernel at (default: "
                        f"{DECODE_SHAPES}; '': none)")
    args = p.parse_args(argv)
    if args.decode_shapes and args.decode_shapes.count(":") != 1:
        p.error(f"--decode-shapes: expected MODULE:FUNCTION, got {args.decode_shapes!r}")
    if not args.compile_check:
        import torch

        from .dispatch import active_backends, requested_backend

        print(f"torch {torch.__version__}; requested backend: {requested_backend()}")
        for name, ok in active_backends().items():
            print(f"  {name:7s} {'active' if ok else 'unavailable'}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels were made interpreted at import: start again
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "medix_fast.kernels", *sys.argv[1:]], env)
    from .compile_check import main as check

    shapes = ()
    if args.decode_shapes:
        module, _, function = args.decode_shapes.partition(":")
        try:
            shapes = getattr(importlib.import_module(module), function)()
        except (ImportError, AttributeError) as err:
            p.error(f"--decode-shapes {args.decode_shapes}: {err}")
    return check(args.arch, args.select, shapes)


if __name__ == "__main__":
    raise SystemExit(main())
