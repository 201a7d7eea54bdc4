"""The controller's step plans, in plain Python: a plan completes when every attention
instance has submitted it, a plan desk serves the current epoch's book and wakes the old
one's waiters, shutdown wakes every waiter."""

import pytest

from services.common.cluster import Member, Membership
from services.common.cluster_config import ClusterConfig
from services.controller.errors import Conflict, Refused, ShuttingDown, StaleEpoch
from services.controller.plans import PlanBook, PlanDesk, PlanPending
from tests.support.threads import run_in_threads


def test_the_plan_desk_serves_the_current_epoch_and_wakes_the_old_ones_waiters():
    desk = PlanDesk(num_micro_batches=1)
    members = (Member("attention", 1, 0, "a:1"), Member("ffn", 0, 1, "f:1"))
    desk.change(Membership(1, 2, "h", 1, ClusterConfig(num_micro_batches=1), members))
    book = desk.book(1)
    threads, _, errors = run_in_threads(lambda i: book.wait(1, 0, 30), 2)
    desk.change(None)  # the epoch ended
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert len(errors) == 2 and all(isinstance(err, StaleEpoch) for err in errors)
    with pytest.raises(StaleEpoch, match="epoch 1 is over"):
        desk.book(1)
    desk.change(Membership(2, 2, "h", 1, ClusterConfig(num_micro_batches=1), members))
    desk.book(2).submit(2, 0, 1, [5])  # rows are members by index, gaps allowed
    assert desk.book(2).wait(2, 0, 0) == ((5,),)
    desk.shut_down()
    with pytest.raises(ShuttingDown):
        desk.book(2)


# ---- plans --------------------------------------------------------------------------------


def test_a_plan_completes_when_every_attention_instance_has_submitted():
    plans = PlanBook(epoch=1, attention_indices=(0, 1), num_micro_batches=3)
    plans.submit(1, 0, 1, [4, 5, 6])
    assert plans.wait(1, 0, 0) == PlanPending(missing_attention_indices=(0,))
    assert plans.wait(1, 1, 0) == PlanPending(missing_attention_indices=(0, 1))
    plans.submit(1, 0, 0, [1, 2, 3])
    assert plans.wait(1, 0, 0) == ((1, 2, 3), (4, 5, 6))


def test_waiters_in_threads_all_get_the_plan():
    plans = PlanBook(epoch=1, attention_indices=(0, 1), num_micro_batches=2)
    threads, results, errors = run_in_threads(lambda i: plans.wait(1, 7, 10), 4)
    plans.submit(1, 7, 0, [1, 1])
    plans.submit(1, 7, 1, [2, 0])
    for thread in threads:
        thread.join(5)
    assert not errors and results == [((1, 1), (2, 0))] * 4


def test_resubmission_same_counts_is_a_retry_different_counts_after_completion_a_conflict():
    plans = PlanBook(epoch=1, attention_indices=(0, 1), num_micro_batches=1)
    plans.submit(1, 3, 0, [9])
    plans.submit(1, 3, 0, [8])  # not complete yet: nobody has seen it
    plans.submit(1, 3, 1, [2])
    plans.submit(1, 3, 1, [2])
    with pytest.raises(Conflict, match=r"step 3 again with counts \[7\].*\[8\]"):
        plans.submit(1, 3, 0, [7])
    assert plans.wait(1, 3, 0) == ((8,), (2,))


def test_plans_check_epoch_length_index_and_sign():
    plans = PlanBook(epoch=1, attention_indices=(0,), num_micro_batches=3)
    with pytest.raises(
        StaleEpoch, match="for epoch 2 but the cluster is at epoch 1: register again"
    ):
        plans.submit(2, 0, 0, [1, 1, 1])
    with pytest.raises(StaleEpoch, match="epoch 0"):
        plans.wait(0, 0, 0)
    with pytest.raises(Refused, match="2 micro-batch counts.*3 micro-batches"):
        plans.submit(1, 0, 0, [1, 1])
    with pytest.raises(Refused, match="attention instance 1 is not a member of epoch 1"):
        plans.submit(1, 0, 1, [1, 1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        plans.submit(1, 0, 0, [1, -1, 1])


def test_only_recent_steps_are_kept():
    plans = PlanBook(epoch=1, attention_indices=(0, 1), num_micro_batches=1, keep_steps=4)
    threads, _, errors = run_in_threads(lambda i: plans.wait(1, 0, 30), 1)  # never completes
    for step in range(1, 6):
        plans.submit(1, step, 0, [step])
        plans.submit(1, step, 1, [step])
    threads[0].join(5)
    assert not threads[0].is_alive(), "a waiter on a dropped step must be woken"
    assert len(errors) == 1 and "no longer kept" in str(errors[0])
    with pytest.raises(Refused, match="step 0 is more than 4 steps behind the newest step 5"):
        plans.submit(1, 0, 0, [1])
    assert plans.wait(1, 1, 0) == ((1,), (1,))
    assert plans.wait(1, 5, 0) == ((5,), (5,))


def test_shutdown_wakes_plan_waiters():
    plans = PlanBook(epoch=1, attention_indices=(0, 1), num_micro_batches=1)
    threads, _, errors = run_in_threads(lambda i: plans.wait(1, i, 30), 3)
    plans.shut_down()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert len(errors) == 3 and all(isinstance(err, ShuttingDown) for err in errors)
