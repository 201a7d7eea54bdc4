"""The controller's registry, in plain Python: registration forms the membership, epochs
end and re-form around failures, leaves and restarts, resizing (a StatefulSet scaled) adds
and removes places, shutdown wakes every waiter."""

import pytest

from services.common.cluster import ClusterState, Member, Membership
from services.common.cluster_config import ClusterConfig
from services.common.ffn_instances import door_ranks, instance_ranks
from services.controller.errors import Conflict, Refused, ShuttingDown
from services.controller.membership import ClusterSpec, RegistrationPending, Registry
from tests.support.threads import run_in_threads

FP = "f" * 16
CONFIG = ClusterConfig(num_micro_batches=1)


def make_registry(num_attention=2, num_ffn=1, clock=None):
    spec = ClusterSpec(num_attention, num_ffn, ClusterConfig(num_micro_batches=3), fingerprint=FP)
    kwargs = {"clock": clock} if clock else {}
    return Registry(spec, "store-host", 1234, **kwargs)


# ---- membership ---------------------------------------------------------------------------


def test_membership_forms_when_the_last_member_registers_with_ranks_by_role_then_index():
    registry = make_registry(num_attention=2, num_ffn=2)
    registry.register("ffn", 1, "f1:1", FP)
    registry.register("attention", 1, "a1:1", FP)
    pending = registry.wait("attention", 1, "a1:1", 0)
    assert pending == RegistrationPending(missing=(("attention", 0), ("ffn", 0)))
    registry.register("attention", 0, "a0:1", FP)
    registry.register("ffn", 0, "f0:1", FP)
    membership = registry.wait("attention", 1, "a1:1", 0)
    assert isinstance(membership, Membership)
    assert membership.epoch == 1 and membership.world_size == 4
    assert (membership.store_host, membership.store_port) == ("store-host", 1234)
    assert membership.config == ClusterConfig(num_micro_batches=3)
    assert membership.members == (
        Member("attention", 0, 0, "a0:1"),
        Member("attention", 1, 1, "a1:1"),
        Member("ffn", 0, 2, "f0:1"),
        Member("ffn", 1, 3, "f1:1"),
    )
    assert membership.attention_ranks == [0, 1] and membership.ffn_ranks == [2, 3]
    assert membership.rank_of("ffn", 1) == 3


def test_every_waiter_gets_the_same_membership():
    registry = make_registry(num_attention=2, num_ffn=2)
    slots = registry.spec.slots()

    def join(i):
        role, index = slots[i]
        registry.register(role, index, f"host{i}:1", FP)
        return registry.wait(role, index, f"host{i}:1", 10)

    threads, results, errors = run_in_threads(join, len(slots))
    for thread in threads:
        thread.join()
    assert not errors
    assert isinstance(results[0], Membership)
    assert all(result is results[0] for result in results)


def test_a_wrong_fingerprint_is_refused_naming_both():
    registry = make_registry()
    with pytest.raises(Refused, match=f"ffn instance 0 serves model fingerprint abc.*{FP}"):
        registry.register("ffn", 0, "f0:1", "abc")


def test_an_index_taken_by_another_address_is_refused_and_the_same_address_may_repeat():
    registry = make_registry()
    registry.register("attention", 0, "a:1", FP)
    registry.register("attention", 0, "a:1", FP)
    with pytest.raises(Conflict, match="already registered from a:1"):
        registry.register("attention", 0, "b:1", FP)
    registry.register("attention", 1, "a1:1", FP)
    registry.register("ffn", 0, "f0:1", FP)
    registry.register("attention", 0, "a:1", FP)  # after forming, too
    assert isinstance(registry.wait("attention", 0, "a:1", 0), Membership)


def test_roles_and_indices_are_checked():
    registry = make_registry(num_attention=2, num_ffn=1)
    with pytest.raises(ValueError, match="role"):
        registry.register("expert", 0, "x:1", FP)
    with pytest.raises(Refused, match="ffn index 1 is out of range.*1 ffn instance"):
        registry.register("ffn", 1, "x:1", FP)
    with pytest.raises(ValueError, match="address"):
        registry.register("ffn", 0, "", FP)


def test_heartbeats_record_last_seen_and_turn_false_on_shutdown():
    now = [100.0]
    registry = make_registry(clock=lambda: now[0])
    with pytest.raises(Refused, match="not registered.*register again"):
        registry.heartbeat("ffn", 0)
    registry.register("ffn", 0, "f:1", FP)
    assert registry.last_seen("ffn", 0) == 100.0
    now[0] = 101.5
    assert registry.heartbeat("ffn", 0) == (True, 1)
    assert registry.last_seen("ffn", 0) == 101.5
    assert registry.last_seen("attention", 0) is None
    registry.shut_down()
    assert registry.heartbeat("ffn", 0) == (False, 1)


def test_shutdown_wakes_registration_waiters_and_refuses_newcomers():
    registry = make_registry()
    registry.register("attention", 0, "a:1", FP)
    threads, _, errors = run_in_threads(lambda i: registry.wait("attention", 0, "a:1", 30), 3)
    registry.shut_down()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert len(errors) == 3 and all(isinstance(err, ShuttingDown) for err in errors)
    with pytest.raises(ShuttingDown):
        registry.register("attention", 1, "a1:1", FP)


def test_cluster_spec_and_membership_validate_on_construction():
    with pytest.raises(ValueError, match="num_ffn_instances"):
        ClusterSpec(1, 0, CONFIG, FP)
    with pytest.raises(ValueError, match="fingerprint"):
        ClusterSpec(1, 1, CONFIG, "")
    with pytest.raises(ValueError, match="ranks"):
        Membership(1, 2, "h", 1, CONFIG, (Member("attention", 0, 1, "a:1"),))
    with pytest.raises(ValueError, match="precede"):
        Membership(
            1, 2, "h", 1, CONFIG, (Member("ffn", 0, 0, "f:1"), Member("attention", 0, 1, "a:1"))
        )
    a1, f0 = Member("attention", 1, 0, "a:1"), Member("ffn", 0, 1, "f:1")
    with pytest.raises(ValueError, match="attention indices"):
        Membership(1, 1, "h", 1, CONFIG, (Member("ffn", 0, 0, "f:1"),))
    with pytest.raises(ValueError, match="ffn indices must be 0..0"):
        Membership(1, 2, "h", 1, CONFIG, (a1, Member("ffn", 1, 1, "f:1")))
    gap = Membership(1, 2, "h", 1, CONFIG, (a1, f0))  # attention instance 0 left out
    assert gap.attention_indices == [1] and gap.address_of("attention", 0) is None
    with pytest.raises(KeyError, match="no ffn instance 5"):
        gap.rank_of("ffn", 5)


# ---- epochs: the cluster re-forms around failures ------------------------------------------


def formed_cluster(now, num_attention=2, num_ffn=2, listener=None):
    spec = ClusterSpec(num_attention, num_ffn, CONFIG, fingerprint=FP)
    registry = Registry(spec, "h", 1, clock=lambda: now[0], on_change=listener)
    for role, index in spec.slots():
        registry.register(role, index, f"{role}{index}:1", FP)
    membership = registry.wait("attention", 0, "attention0:1", 0)
    assert isinstance(membership, Membership) and membership.epoch == 1
    return registry


def test_a_silent_ffn_member_ends_the_epoch_and_its_replacement_forms_the_next():
    now, changes = [0.0], []
    registry = formed_cluster(now, listener=changes.append)
    now[0] = 2.0
    for role, index in [("attention", 0), ("attention", 1), ("ffn", 0)]:
        assert registry.heartbeat(role, index) == (True, 1)
    now[0] = 3.5  # ffn 1 last heard of at 0: past the 3 s timeout
    registry.tick()
    assert registry.epoch == 0 and changes[-1] is None
    assert registry.heartbeat("ffn", 0) == (True, 2)  # members learn the cluster moved on
    for role, index in [("attention", 0), ("attention", 1), ("ffn", 0)]:
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=1)
    pending = registry.wait("ffn", 0, "ffn0:1", 0)
    assert pending == RegistrationPending(missing=(("ffn", 1),)), "the experts must be served"
    registry.register("ffn", 1, "replacement:1", FP)  # the dead holder's place is free
    membership = registry.wait("ffn", 1, "replacement:1", 0)
    assert membership.epoch == 2 and membership.address_of("ffn", 1) == "replacement:1"
    assert changes[-1] == membership and registry.epoch == 2


def test_a_member_whose_group_broke_opens_the_next_epoch_and_the_others_follow():
    now = [0.0]
    registry = formed_cluster(now)
    registry.register("attention", 0, "attention0:1", FP, last_epoch=1)  # its step failed
    assert registry.heartbeat("ffn", 1) == (True, 2)
    # A retry of registration with an older last_epoch is not a failure report.
    for role, index in [("attention", 1), ("ffn", 0), ("ffn", 1)]:
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=1)
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=1)
    membership = registry.wait("ffn", 1, "ffn1:1", 0)
    assert membership.epoch == 2 and membership.world_size == 4
    registry.register("ffn", 1, "ffn1:1", FP, last_epoch=0)  # a late retry changes nothing
    assert registry.epoch == 2


def test_a_dead_attention_member_is_left_out_and_joins_again_in_a_later_epoch():
    now = [0.0]
    registry = formed_cluster(now)
    now[0] = 2.0
    for role, index in [("attention", 1), ("ffn", 0), ("ffn", 1)]:
        registry.heartbeat(role, index)
    now[0] = 3.5
    registry.tick()  # attention 0 is silent: epoch 2 forms without it
    for role, index in [("attention", 1), ("ffn", 0), ("ffn", 1)]:
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=1)
    membership = registry.wait("attention", 1, "attention1:1", 0)
    assert membership.epoch == 2 and membership.attention_indices == [1]
    assert membership.attention_ranks == [0] and membership.ffn_ranks == [1, 2]
    registry.register("attention", 0, "restarted:1", FP)  # its replacement: epoch 3
    assert registry.epoch == 0
    for role, index in [("attention", 1), ("ffn", 0), ("ffn", 1)]:
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=2)
    membership = registry.wait("attention", 0, "restarted:1", 0)
    assert membership.epoch == 3 and membership.attention_indices == [0, 1]


def test_a_live_holder_keeps_its_place_and_a_leaving_member_is_not_waited_for():
    now = [0.0]
    registry = formed_cluster(now)
    with pytest.raises(Conflict, match="already registered from ffn0:1"):
        registry.register("ffn", 0, "impostor:1", FP)
    assert registry.epoch == 1
    registry.leave("attention", 1)  # drained
    for role, index in [("attention", 0), ("ffn", 0), ("ffn", 1)]:
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=1)
    membership = registry.wait("attention", 0, "attention0:1", 0)
    assert membership.epoch == 2 and membership.attention_indices == [0]
    with pytest.raises(Refused, match="not registered"):
        registry.heartbeat("attention", 1)
    with pytest.raises(ValueError, match="exceed the 1 s heartbeat"):
        Registry(registry.spec, "h", 1, silent_after_s=1.0)


# ---- resizing: a StatefulSet scaled ---------------------------------------------------------


def rejoin(registry, slots, last_epoch):
    for role, index in slots:
        registry.register(role, index, f"{role}{index}:1", FP, last_epoch=last_epoch)


def test_scaling_attention_up_serves_on_until_the_new_member_registers_then_reforms():
    now = [0.0]
    registry = formed_cluster(now, num_attention=1, num_ffn=1)
    with pytest.raises(Refused, match="expects 1 attention instance"):
        registry.register("attention", 1, "early:1", FP)
    registry.resize(2, 1)
    assert registry.epoch == 1, "the cluster serves on while the new pod loads"
    assert registry.wait("attention", 0, "attention0:1", 0).epoch == 1
    registry.register("attention", 1, "attention1:1", FP)
    assert registry.epoch == 0
    rejoin(registry, [("attention", 0), ("ffn", 0)], last_epoch=1)
    membership = registry.wait("attention", 1, "attention1:1", 0)
    assert membership.epoch == 2 and membership.attention_indices == [0, 1]


def test_scaling_attention_down_lets_the_removed_member_drain_then_reforms_without_it():
    now = [0.0]
    registry = formed_cluster(now, num_attention=2, num_ffn=1)
    registry.resize(1, 1)
    assert registry.epoch == 1, "attention 1 finishes its requests first"
    assert registry.heartbeat("attention", 1) == (True, 1)
    # Another member's group breaks meanwhile: the draining member is still part of epoch 2.
    registry.register("ffn", 0, "ffn0:1", FP, last_epoch=1)
    rejoin(registry, [("attention", 0), ("attention", 1)], last_epoch=1)
    assert registry.wait("attention", 1, "attention1:1", 0).attention_indices == [0, 1]
    registry.leave("attention", 1)  # drained
    rejoin(registry, [("attention", 0), ("ffn", 0)], last_epoch=2)
    membership = registry.wait("attention", 0, "attention0:1", 0)
    assert membership.epoch == 3 and membership.attention_indices == [0]
    with pytest.raises(Refused, match="out of range"):
        registry.register("attention", 1, "attention1:1", FP)


def test_scaling_ffn_up_reforms_with_every_ffn_place_once_the_new_one_registers():
    now = [0.0]
    registry = formed_cluster(now, num_attention=1, num_ffn=1)
    registry.resize(1, 3)
    registry.register("ffn", 2, "ffn2:1", FP)  # before ffn 1: the experts need 0..n-1
    assert registry.epoch == 1, "an FFN place past a gap does not end the epoch"
    assert registry.wait("ffn", 2, "ffn2:1", 0) == RegistrationPending(missing=(("ffn", 1),))
    registry.register("ffn", 1, "ffn1:1", FP)
    rejoin(registry, [("attention", 0), ("ffn", 0), ("ffn", 2)], last_epoch=1)
    membership = registry.wait("ffn", 1, "ffn1:1", 0)
    assert membership.epoch == 2 and len(membership.ffn_ranks) == 3


def test_scaling_ffn_down_reforms_when_the_removed_member_leaves_or_goes_silent():
    now = [0.0]
    registry = formed_cluster(now, num_attention=1, num_ffn=3)
    registry.resize(1, 2)
    assert registry.epoch == 1, "ffn 2 still holds its experts"
    registry.leave("ffn", 2)
    rejoin(registry, [("attention", 0), ("ffn", 0), ("ffn", 1)], last_epoch=1)
    membership = registry.wait("ffn", 1, "ffn1:1", 0)
    assert membership.epoch == 2 and len(membership.ffn_ranks) == 2
    # A pod lost with its node never leaves: silence above the size forgets its place.
    registry.resize(1, 1)
    now[0] = 2.0
    for role, index in [("attention", 0), ("ffn", 0)]:
        registry.heartbeat(role, index)
    now[0] = 3.5
    registry.tick()
    rejoin(registry, [("attention", 0), ("ffn", 0)], last_epoch=2)
    membership = registry.wait("ffn", 0, "ffn0:1", 0)
    assert membership.epoch == 3 and len(membership.ffn_ranks) == 1
    assert registry.state() == ClusterState(3, membership, 1, 1, CONFIG)


def test_an_ffn_member_that_leaves_within_the_size_is_waited_for_not_resharded_away():
    now = [0.0]
    registry = formed_cluster(now, num_attention=1, num_ffn=2)
    registry.leave("ffn", 1)  # a rolling restart or an evicted pod: it comes back
    rejoin(registry, [("attention", 0), ("ffn", 0)], last_epoch=1)
    pending = registry.wait("ffn", 0, "ffn0:1", 0)
    assert pending == RegistrationPending(missing=(("ffn", 1),)), "ffn 0 cannot hold it all"


def test_a_process_restarted_at_the_same_address_is_a_new_member_not_a_retry():
    now = [0.0]
    spec = ClusterSpec(1, 1, CONFIG, fingerprint=FP)
    registry = Registry(spec, "h", 1, clock=lambda: now[0])
    for role in ("attention", "ffn"):
        registry.register(role, 0, f"{role}:1", FP, incarnation=f"{role}-first")
    assert registry.wait("ffn", 0, "ffn:1", 0).epoch == 1
    registry.register("ffn", 0, "ffn:1", FP, incarnation="ffn-first")  # a retry
    assert registry.epoch == 1
    registry.register("ffn", 0, "ffn:1", FP, incarnation="ffn-second")  # container restarted
    assert registry.epoch == 0, "the old process's group is gone with it"
    registry.register(
        "attention", 0, "attention:1", FP, last_epoch=1, incarnation="attention-first"
    )
    assert registry.wait("ffn", 0, "ffn:1", 0).epoch == 2


def test_a_deleted_pod_takes_its_member_out_at_once_but_not_its_replacement():
    now = [0.0]
    registry = formed_cluster(now, num_attention=2, num_ffn=1)
    registry.gone("attention", 1, "elsewhere")  # another pod's address: not this member
    assert registry.epoch == 1
    registry.gone("attention", 1, "attention1")  # killed without leaving; pod deleted
    rejoin(registry, [("attention", 0), ("ffn", 0)], last_epoch=1)
    assert registry.wait("attention", 0, "attention0:1", 0).attention_indices == [0]


# ---- FFN instances of several processes ------------------------------------------------------

GROUPED = ClusterConfig(num_micro_batches=1, ffn_instance_size=2)


def grouped_cluster(now, num_attention=3, num_ffn=2):
    spec = ClusterSpec(num_attention, num_ffn, GROUPED, fingerprint=FP)
    registry = Registry(spec, "h", 1, clock=lambda: now[0])
    for role, index in spec.slots():
        registry.register(role, index, f"{role}{index}:1", FP)
    return registry


def test_an_ffn_instance_of_g_processes_takes_g_places_named_by_instance_and_process():
    now = [0.0]
    registry = grouped_cluster(now)
    assert registry.spec.slots()[3:] == [("ffn", p) for p in range(4)]
    membership = registry.wait("ffn", 3, "ffn3:1", 0)
    assert membership.ffn_ranks == [3, 4, 5, 6] and membership.world_size == 7
    assert instance_ranks(membership) == [[3, 4], [5, 6]]
    # Attention instance a enters every FFN instance at its process a % G.
    assert [door_ranks(membership, a) for a in membership.attention_ranks] == [
        [3, 5], [4, 6], [3, 5],
    ]  # fmt: skip
    assert membership.name_of(membership.members[6]) == "ffn instance 1 process 1"
    state = registry.state()
    assert (state.num_attention_places, state.num_ffn_places) == (3, 4)
    with pytest.raises(Refused, match=r"2 ffn instance\(s\) of 2 processes, indices 0..3"):
        registry.register("ffn", 4, "x:1", FP)


def test_a_dead_process_takes_its_instance_out_and_the_cluster_reforms_when_it_is_back():
    now = [0.0]
    registry = grouped_cluster(now)
    now[0] = 2.0
    alive = [("attention", i) for i in range(3)] + [("ffn", p) for p in (0, 1, 3)]
    for role, index in alive:
        registry.heartbeat(role, index)
    now[0] = 3.5  # ffn 2 (instance 1, process 0) is silent
    registry.tick()
    assert registry.epoch == 0
    rejoin(registry, alive, last_epoch=1)
    pending = registry.wait("ffn", 3, "ffn3:1", 0)
    assert pending == RegistrationPending(missing=(("ffn", 2),))
    registry.register("ffn", 2, "restarted:1", FP)
    membership = registry.wait("ffn", 2, "restarted:1", 0)
    assert membership.epoch == 2 and len(membership.ffn_ranks) == 4


def test_scaling_ffn_adds_and_removes_whole_instances():
    now = [0.0]
    registry = grouped_cluster(now, num_attention=1, num_ffn=1)
    registry.resize(1, 2)
    registry.register("ffn", 2, "ffn2:1", FP)  # half of the new instance: it waits
    assert registry.wait("ffn", 2, "ffn2:1", 0) == RegistrationPending(missing=(("ffn", 3),))
    registry.register("ffn", 3, "ffn3:1", FP)
    rejoin(registry, [("attention", 0), ("ffn", 0), ("ffn", 1), ("ffn", 2)], last_epoch=1)
    membership = registry.wait("ffn", 3, "ffn3:1", 0)
    assert membership.epoch == 2 and instance_ranks(membership) == [[1, 2], [3, 4]]
    # The pod of instance 1 is deleted: both its processes go at once.
    registry.resize(1, 1)
    registry.gone("ffn", 1, "ffn2")
    registry.gone("ffn", 1, "ffn3")
    rejoin(registry, [("attention", 0), ("ffn", 0), ("ffn", 1)], last_epoch=2)
    membership = registry.wait("ffn", 0, "ffn0:1", 0)
    assert membership.epoch == 3 and instance_ranks(membership) == [[1, 2]]


def test_a_membership_of_part_of_an_instance_is_refused():
    members = (Member("attention", 0, 0, "a:1"), Member("ffn", 0, 1, "f:1"))
    with pytest.raises(ValueError, match="1 FFN processes do not make whole FFN instances of 2"):
        Membership(1, 2, "h", 1, GROUPED, members)
