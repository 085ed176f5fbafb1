"""Print which kernel back-ends are active here: ``python -m medix_fast.kernels``."""
import torch

from .dispatch import active_backends, requested_backend

if __name__ == "__main__":
    print(f"torch {torch.__version__}; requested backend: {requested_backend()}")
    for name, ok in active_backends().items():
        print(f"  {name:7s} {'active' if ok else 'unavailable'}")
