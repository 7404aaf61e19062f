"""Random draws as a pure function of (seed, rank, step), and when ranks sharing a process must
hold the generators one at a time (no Ray)."""

import threading

import numpy as np
import torch

from raytrain_ft import rng


def test_a_step_draws_the_same_whatever_was_drawn_before_and_other_steps_differ():
    def draw(step):
        with rng.drawn_for(3, 1, step, rng.COMPUTE):
            return torch.rand(4), np.random.random(), __import__("random").random()

    first = draw(7)
    torch.rand(100), np.random.random(10)  # the generators move on
    again = draw(7)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert not torch.equal(draw(8)[0], first[0])
    assert rng.step_seed(3, 1, 7, rng.COMPUTE) != rng.step_seed(3, 2, 7, rng.COMPUTE)
    assert rng.step_seed(3, 1, 7, rng.COMPUTE) != rng.step_seed(3, 1, 7, rng.DATA)


def _side_by_side(draws: rng.SharedDraws, step: int) -> bool:
    """Whether ``step`` runs without the generators' lock (another thread holds it meanwhile)."""
    held, done = threading.Event(), threading.Event()

    def hold():
        with rng._LOCK:
            held.set()
            done.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    entered = threading.Event()

    def run():
        with draws.step(0, 0, step):
            entered.set()

    runner = threading.Thread(target=run)
    runner.start()
    free = entered.wait(0.5)
    done.set()
    runner.join()
    holder.join()
    return free


def test_ranks_whose_model_draws_nothing_compute_side_by_side_and_are_checked_again():
    draws = rng.SharedDraws()
    with draws.step(0, 0, 1):
        torch.zeros(3) + 1  # draws nothing
    assert draws.draws is False
    assert _side_by_side(draws, 2)
    assert not _side_by_side(draws, rng.PROBE_EVERY)  # computed alone, watched again


def test_a_model_that_draws_holds_the_generators_for_every_step_and_repeats_its_draws():
    draws = rng.SharedDraws()
    for step in (1, 2):
        with draws.step(0, 0, step):
            torch.nn.functional.dropout(torch.ones(8), 0.5)
    assert draws.draws is True and draws.began_late is None
    assert not _side_by_side(draws, 3)
    with draws.step(5, 1, 9):
        a = torch.rand(4)
    with draws.step(5, 1, 9):
        b = torch.rand(4)
    assert torch.equal(a, b)


def test_a_model_that_begins_to_draw_late_is_held_from_then_on_and_said(caplog):
    draws = rng.SharedDraws()
    with draws.step(0, 0, 1):
        pass
    with draws.step(0, 0, rng.PROBE_EVERY):
        np.random.random()
    assert draws.draws is True and draws.began_late == (0, rng.PROBE_EVERY)
    assert "drew random numbers at step 64" in caplog.text
    assert not _side_by_side(draws, rng.PROBE_EVERY + 1)
