"""I1 judged from the workers' own records: every push a worker saw acknowledged is in the final
state once.

Pure (no Ray): the chaos tests and ``experiments/chaos_matrix`` read the ledgers after a run.

Workers append each acknowledged push to a ledger file (``RAYTRAIN_FT_LEDGER_DIR``) as the answer
arrives, so the record outlives a killed worker. The shards' side is their applied record
(``TrainResult.applied_counts``: per shard and rank, how many times each step's push went into an
update), replayed from the replica like the parameters. Neither side is a counter the system could
reset.
"""

from __future__ import annotations

import glob
import os


def read_ledgers(directory: str, run_id: str) -> list[tuple[int, int, int, int, bool]]:
    entries = []
    for path in glob.glob(os.path.join(directory, f"{run_id}.*.ledger")):
        with open(path) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 5:  # a line cut by a SIGKILL mid-write is not an acknowledgement
                    shard, rank, step, seq, late = map(int, parts)
                    entries.append((shard, rank, step, seq, bool(late)))
    return entries


def exactly_once_violations(
    applied_counts: list[dict], ledger: list, num_workers: int, steps: int, every_step: bool = True
) -> list[str]:
    """What breaks I1, if anything. ``every_step``: every (rank, step) must be applied once (all
    modes but backup workers, which may drop pushes)."""
    try:
        assert_exactly_once(applied_counts, ledger, num_workers, steps, every_step)
    except AssertionError as e:
        return [str(e)]
    return []


def assert_exactly_once(
    applied_counts: list[dict], ledger: list, num_workers: int, steps: int, every_step: bool = True
) -> None:
    """``every_step``: plain sync and async runs apply every (rank, step) once (backup workers may
    drop some)."""
    assert ledger, "no ledger entries: was RAYTRAIN_FT_LEDGER_DIR set for the workers?"
    counts = [
        {int(r): [int(c) for c in digits] for r, digits in shard.items()}
        for shard in applied_counts
    ]

    def count(shard, rank, step):
        row = counts[shard].get(rank, [])
        return row[step] if step < len(row) else 0

    for shard, rank, step, _, late in ledger:
        n = count(shard, rank, step)
        if late:
            assert n == 0, (
                f"shard {shard}: push ({rank}, {step}) was answered as dropped yet applied {n} "
                "times"
            )
        else:
            assert n == 1, (
                f"shard {shard}: push ({rank}, {step}) was acknowledged but applied {n} times"
            )
    for shard, rows in enumerate(counts):
        for rank, row in rows.items():
            assert all(c <= 1 for c in row), (
                f"shard {shard}: a push of rank {rank} was applied twice: {row}"
            )
        if every_step:
            for rank in range(num_workers):
                assert [count(shard, rank, s) for s in range(steps)] == [1] * steps, (
                    f"shard {shard} rank {rank}: {counts[shard].get(rank)}"
                )
