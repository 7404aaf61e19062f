"""The push thread a worker sends shards from during backward (no Ray, no GPU): every queued shard
is sent, in the order backward finished them, before ``drain`` returns; a failed send is raised by
``drain`` in the training thread, and the shards queued after it are not sent."""

import threading
import time

import pytest
import torch

from raytrain_ft.actors.worker import _Sender


def test_drain_returns_once_every_queued_shard_is_sent_in_order():
    sent, threads = [], set()

    def push(i):
        time.sleep(0.002)  # a send takes a while: drain must wait for it
        sent.append(i)
        threads.add(threading.current_thread().name)

    sender = _Sender(push, torch.device("cpu"))
    for i in (3, 2, 1, 0):  # backward finishes the last shards first
        sender.submit(i)
    sender.drain()
    assert sent == [3, 2, 1, 0]
    assert threads == {"shard-sender"}  # not the training thread
    sender.submit(5)
    sender.drain()
    assert sent[-1] == 5


def test_a_failed_send_is_raised_by_drain_and_stops_the_rest():
    sent = []

    def push(i):
        if i == 1:
            raise RuntimeError("shard 1 unreachable")
        sent.append(i)

    sender = _Sender(push, torch.device("cpu"))
    for i in (2, 1, 0):
        sender.submit(i)
    with pytest.raises(RuntimeError, match="shard 1 unreachable"):
        sender.drain()
    assert sent == [2]
    # raised once; the thread goes on serving the next step
    sender.submit(4)
    sender.drain()
    assert sent == [2, 4]
