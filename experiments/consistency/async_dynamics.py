"""Why asynchronous SGD lost to sync on digits, and what closes the gap: a model of the dynamics in
one process, without Ray.

The same data, partitions, batches, CNN and initialisation as a real run
(``raytrain_ft.data``, ``raytrain_ft.models``), and the servers' update
rules, but the workers are simulated in one process so that the *order* of
arrivals can be chosen:

- ``sync``: each step averages the ``W`` workers' gradients at the same
  parameters (reproduces the real sync runs' accuracy per seed exactly);
- ``async``, order ``round-robin``: the workers push in a fixed cycle, so
  every gradient is computed on parameters exactly ``W - 1`` updates old (the
  worst case of asynchrony, and close to what equal workers on equal cores
  do);
- ``async``, order ``random``: each next push comes from a worker drawn at
  random (same mean staleness, but many gradients are fresh).

Async applies ``lr / W`` per push (``Rule.lr_scale``) with momentum either on
the shard's one buffer (``--momentum-correction none``) or per worker with
look-ahead pulls (``dana``, ``Rule.momentum_stream``).

    python experiments/consistency/async_dynamics.py \\
        --output experiments/consistency/results_async_dynamics_x86-2core_202611.json

Prints eval accuracy per seed and the mean for each case, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import numpy as np
import torch

from raytrain_ft.config import DataConfig
from raytrain_ft.data import batch_indices, load_digits, partition, steps_per_epoch
from raytrain_ft.models import SmallCNN

CASES = [
    # (mode, momentum handling, arrival order, workers[, (momentum, lr)]; default (0.9, 0.05))
    ("sync", "-", "-", 4),
    ("async", "none", "round-robin", 4),
    ("async", "none", "random", 4),
    ("async", "dana", "round-robin", 4),
    ("async", "dana", "random", 4),
    ("sync", "-", "-", 8),
    ("async", "none", "round-robin", 8),
    ("async", "none", "random", 8),
    ("async", "dana", "round-robin", 8),
    ("async", "dana", "random", 8),
    # one buffer, fixed order, a lower momentum at the same step per gradient, lr / (1 - m) = 0.5
    ("async", "none", "round-robin", 4, (0.75, 0.125)),
    ("async", "none", "round-robin", 4, (0.5, 0.25)),
    ("async", "none", "round-robin", 4, (0.0, 0.5)),
]


def run(mode, correction, order, workers, seed, epochs=5, lr=0.05, momentum=0.9, batch=32):
    ds = load_digits(DataConfig(), seed)
    n = len(ds.train_y)
    spe = steps_per_epoch(n, workers, batch)
    parts = [partition(n, r, workers, seed) for r in range(workers)]
    torch.manual_seed(seed)
    model = SmallCNN(ds.in_shape, 10)
    params = list(model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()

    def grad_at(values, rank, step):
        replica = copy.deepcopy(model)
        with torch.no_grad():
            for p, v in zip(replica.parameters(), values):
                p.copy_(v)
        epoch, s = divmod(step, spe)
        idx = batch_indices(parts[rank], seed, epoch, rank, s, batch)
        loss_fn(replica(ds.train_x[idx]), ds.train_y[idx]).backward()
        return [p.grad.detach().clone() for p in replica.parameters()]

    def snapshot():
        return [p.detach().clone() for p in params]

    total = spe * epochs
    if mode == "sync":
        buf = None
        for t in range(total):
            at = snapshot()
            grads = [grad_at(at, r, t) for r in range(workers)]
            mean = [sum(gs) / workers for gs in zip(*grads)]
            buf = mean if buf is None else [b.mul_(momentum).add_(g) for b, g in zip(buf, mean)]
            with torch.no_grad():
                for p, b in zip(params, buf):
                    p.add_(b, alpha=-lr)
    else:
        rng = np.random.default_rng(seed)
        streams = workers if correction == "dana" else 1
        bufs = [[torch.zeros_like(p) for p in params] for _ in range(streams)]
        started = [False] * streams
        pulled = {r: snapshot() for r in range(workers)}
        next_step = dict.fromkeys(range(workers), 0)
        scale = lr / workers
        while any(next_step[r] < total for r in range(workers)):
            live = [r for r in range(workers) if next_step[r] < total]
            if order == "random":
                rank = live[rng.integers(len(live))]
            else:
                rank = min(live, key=lambda q: (next_step[q], q))
            g = grad_at(pulled[rank], rank, next_step[rank])
            next_step[rank] += 1
            s = rank if correction == "dana" else 0
            with torch.no_grad():
                for b, gi in zip(bufs[s], g):
                    b.mul_(momentum if started[s] else 0.0).add_(gi)
                started[s] = True
                for p, b in zip(params, bufs[s]):
                    p.add_(b, alpha=-scale)
                out = snapshot()
                if correction == "dana":  # look-ahead: w - lr * m * (sum of the buffers)
                    for i, o in enumerate(out):
                        o.add_(sum(bufs[j][i] for j in range(streams)), alpha=-scale * momentum)
            pulled[rank] = out
    with torch.no_grad():
        return (model(ds.eval_x).argmax(1) == ds.eval_y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for mode, correction, order, workers, *optim in CASES:
        momentum, lr = optim[0] if optim else (0.9, 0.05)
        accs = [
            run(mode, correction, order, workers, seed, momentum=momentum, lr=lr) for seed in seeds
        ]
        rows.append(
            dict(
                mode=mode,
                correction=correction,
                order=order,
                workers=workers,
                momentum=momentum,
                lr=lr,
                accuracy=accs,
            )
        )
        print(
            f"W={workers} {mode:5s} {correction:4s} {order:11s} m={momentum} lr={lr} "
            f"{[round(a, 3) for a in accs]} mean={statistics.mean(accs):.3f}",
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(seeds=seeds, epochs=5, rows=rows), f, indent=1)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
