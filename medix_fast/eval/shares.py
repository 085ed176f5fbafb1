"""The one way an evaluation splits its pending items across ranks and writes what they made:
``append_in_shares`` (calls of ``per_rank`` x world items, every rank its share, rank 0 appending
the gathered records call by call, so that a killed run keeps every call it finished) and
``on_main`` (what rank 0 alone reads, such as which items a file already holds, given to every
rank, an error raised on all of them). ``evaluator.py`` and ``medix_r1.py``'s phases use both.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from .. import distributed as D
from ..errors import UserError


def on_main(info: D.DistInfo, read: Callable[[], object]):
    """``read()`` on rank 0, its result (or the ``UserError`` it raised) on every rank."""
    result = None
    if info.is_main:
        try:
            result = read()
        except UserError as err:
            result = err
    result = D.broadcast_object(result)
    if isinstance(result, UserError):
        raise result
    return result


def append_in_shares(path: Path, pending: list, per_rank: int, info: D.DistInfo,
                     work: Callable[[list, int], list[dict]], desc: str, progress: bool = True) -> None:
    """Every rank: ``pending`` (the same list on every rank) in calls of ``per_rank`` x world
    items; ``work(share, call)`` -> this rank's records for its share (every world-th item of the
    call, possibly none: a collective sampler still takes part); rank 0 appends each call's
    gathered records to ``path`` as JSON lines."""
    from tqdm.auto import tqdm

    rank, world = info.rank, info.world
    per_call = per_rank * world
    bar = tqdm(total=len(pending), desc=desc, unit="item", disable=not (info.is_main and progress))
    with path.open("a", encoding="utf-8") if info.is_main else nullcontext() as f:
        for call, start in enumerate(range(0, len(pending), per_call)):
            gathered = D.gather_objects(work(pending[start:start + per_call][rank::world], call))
            if f is not None:
                lines = [json.dumps(r, ensure_ascii=False) + "\n" for part in gathered for r in part]
                f.write("".join(lines))
                f.flush()
                bar.update(len(lines))
    bar.close()
