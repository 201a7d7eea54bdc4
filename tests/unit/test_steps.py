"""The controller's step book (services/controller/steps.py): openings wake waiters once,
epochs end cleanly, shutdown wakes everyone."""

import threading
import time

import pytest

from services.common.cluster import Member, Membership
from services.common.cluster_config import ClusterConfig
from services.controller.errors import Refused, ShuttingDown, StaleEpoch
from services.controller.steps import StepDesk

MEMBERS = (
    Member("attention", 0, 0, "a0:1"),
    Member("attention", 2, 1, "a2:1"),
    Member("ffn", 0, 2, "f0:1"),
)


def formed(epoch: int = 1) -> StepDesk:
    desk = StepDesk()
    desk.change(Membership(epoch, 3, "h", 1, ClusterConfig(), MEMBERS))
    return desk


def waiting(desk: StepDesk, epoch: int, step: int) -> tuple[threading.Thread, list]:
    outcome: list = []

    def wait() -> None:
        try:
            outcome.append(desk.book(epoch).wait(epoch, step, 10))
        except Exception as err:  # noqa: BLE001 - the test reads it
            outcome.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, outcome


def test_opening_a_step_wakes_its_waiters_and_opens_every_earlier_one():
    desk = formed()
    thread, outcome = waiting(desk, 1, 3)
    time.sleep(0.05)
    desk.open(1, 3, 2)
    thread.join(5)
    assert outcome == [True]
    assert desk.book(1).wait(1, 1, 0)  # steps are opened in order: 3 implies 1
    assert not desk.book(1).wait(1, 4, 0.01)


def test_only_members_open_steps_and_only_in_the_current_epoch():
    desk = formed(2)
    with pytest.raises(Refused, match="attention instance 1 is not a member of epoch 2"):
        desk.open(2, 0, 1)
    with pytest.raises(StaleEpoch, match="epoch 1 but the cluster is at epoch 2"):
        desk.open(1, 0, 0)
    with pytest.raises(Refused, match="epoch 3 has not formed yet"):
        StepDesk().book(3)


def test_an_ending_epoch_and_a_shutdown_wake_waiters_with_why():
    desk = formed()
    thread, outcome = waiting(desk, 1, 0)
    time.sleep(0.05)
    desk.change(None)  # a member died: the epoch is over
    thread.join(5)
    assert isinstance(outcome[0], StaleEpoch) and "re-forming" in str(outcome[0])
    desk = formed()
    thread, outcome = waiting(desk, 1, 0)
    time.sleep(0.05)
    desk.shut_down()
    thread.join(5)
    assert isinstance(outcome[0], ShuttingDown)
