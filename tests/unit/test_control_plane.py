"""The controller's domain, in plain Python: registration forms the membership, plans complete
when every attention instance has submitted, shutdown wakes every waiter. Plus the model
fingerprint and the error interceptor's code table."""

import json
import threading

import grpc
import numpy as np
import pytest
from safetensors.numpy import save_file

from services.common.cluster import ClusterState, Member, Membership
from services.common.fingerprint import model_fingerprint
from services.common.grpc_server import ErrorInterceptor, GrpcServer
from services.controller.errors import Conflict, Refused, ShuttingDown, StaleEpoch
from services.controller.membership import ClusterSpec, RegistrationPending, Registry
from services.controller.plans import PlanBook, PlanDesk, PlanPending

FP = "f" * 16


def make_registry(num_attention=2, num_ffn=1, clock=None):
    spec = ClusterSpec(num_attention, num_ffn, num_micro_batches=3, fingerprint=FP)
    kwargs = {"clock": clock} if clock else {}
    return Registry(spec, "store-host", 1234, **kwargs)


def run_in_threads(fn, n):
    results, errors = [None] * n, []

    def target(i):
        try:
            results[i] = fn(i)
        except Exception as err:  # reported to the test
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads, results, errors


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
    assert membership.num_micro_batches == 3
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
        ClusterSpec(1, 0, 3, FP)
    with pytest.raises(ValueError, match="fingerprint"):
        ClusterSpec(1, 1, 3, "")
    with pytest.raises(ValueError, match="ranks"):
        Membership(1, 2, "h", 1, 3, (Member("attention", 0, 1, "a:1"),))
    with pytest.raises(ValueError, match="precede"):
        Membership(1, 2, "h", 1, 3, (Member("ffn", 0, 0, "f:1"), Member("attention", 0, 1, "a:1")))
    a1, f0 = Member("attention", 1, 0, "a:1"), Member("ffn", 0, 1, "f:1")
    with pytest.raises(ValueError, match="attention indices"):
        Membership(1, 1, "h", 1, 3, (Member("ffn", 0, 0, "f:1"),))
    with pytest.raises(ValueError, match="ffn indices must be 0..0"):
        Membership(1, 2, "h", 1, 3, (a1, Member("ffn", 1, 1, "f:1")))
    gap = Membership(1, 2, "h", 1, 3, (a1, f0))  # attention instance 0 left out
    assert gap.attention_indices == [1] and gap.address_of("attention", 0) is None
    with pytest.raises(KeyError, match="no ffn instance 5"):
        gap.rank_of("ffn", 5)


# ---- epochs: the cluster re-forms around failures ------------------------------------------


def formed_cluster(now, num_attention=2, num_ffn=2, listener=None):
    spec = ClusterSpec(num_attention, num_ffn, num_micro_batches=1, fingerprint=FP)
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
    assert registry.state() == ClusterState(3, membership, 1, 1)


def test_an_ffn_member_that_leaves_within_the_size_is_waited_for_not_resharded_away():
    now = [0.0]
    registry = formed_cluster(now, num_attention=1, num_ffn=2)
    registry.leave("ffn", 1)  # a rolling restart or an evicted pod: it comes back
    rejoin(registry, [("attention", 0), ("ffn", 0)], last_epoch=1)
    pending = registry.wait("ffn", 0, "ffn0:1", 0)
    assert pending == RegistrationPending(missing=(("ffn", 1),)), "ffn 0 cannot hold it all"


def test_a_process_restarted_at_the_same_address_is_a_new_member_not_a_retry():
    now = [0.0]
    spec = ClusterSpec(1, 1, num_micro_batches=1, fingerprint=FP)
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


def test_the_plan_desk_serves_the_current_epoch_and_wakes_the_old_ones_waiters():
    desk = PlanDesk(num_micro_batches=1)
    members = (Member("attention", 1, 0, "a:1"), Member("ffn", 0, 1, "f:1"))
    desk.change(Membership(1, 2, "h", 1, 1, members))
    book = desk.book(1)
    threads, _, errors = run_in_threads(lambda i: book.wait(1, 0, 30), 2)
    desk.change(None)  # the epoch ended
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert len(errors) == 2 and all(isinstance(err, StaleEpoch) for err in errors)
    with pytest.raises(StaleEpoch, match="epoch 1 is over"):
        desk.book(1)
    desk.change(Membership(2, 2, "h", 1, 1, members))
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


# ---- the error interceptor --------------------------------------------------------------


def test_the_most_specific_exception_class_picks_the_status_code():
    # The base class first: the order of the table must not matter.
    interceptor = ErrorInterceptor(
        {
            Refused: grpc.StatusCode.FAILED_PRECONDITION,
            Conflict: grpc.StatusCode.ALREADY_EXISTS,
            ShuttingDown: grpc.StatusCode.ABORTED,
        }
    )
    assert interceptor.code_for(Conflict("x")) is grpc.StatusCode.ALREADY_EXISTS
    assert interceptor.code_for(Refused("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert interceptor.code_for(ShuttingDown()) is grpc.StatusCode.ABORTED
    assert interceptor.code_for(ValueError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert interceptor.code_for(KeyError("x")) is grpc.StatusCode.INTERNAL


def test_the_interceptor_maps_exceptions_of_unary_and_streaming_handlers(caplog):
    def unary(request, context):
        raise Conflict("taken")

    def stream(request, context):
        yield b"one"
        raise ValueError("bad second item")

    def broken(request, context):
        raise KeyError("oops")

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Broken": grpc.unary_unary_rpc_method_handler(broken),
    }
    server = GrpcServer({Refused: grpc.StatusCode.FAILED_PRECONDITION}, max_workers=2)
    server.server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Service", handlers)]
    )
    port = server.bind("127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/test.Service/Unary")(b"", timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "taken"

            responses = channel.unary_stream("/test.Service/Stream")(b"", timeout=5)
            assert next(responses) == b"one"
            with pytest.raises(grpc.RpcError) as err:
                next(responses)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "bad second item"

            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/test.Service/Broken")(b"", timeout=5)
            assert err.value.code() is grpc.StatusCode.INTERNAL
            assert err.value.details() == "/test.Service/Broken failed: KeyError: 'oops'"
            assert "Broken failed" in caplog.text
    finally:
        server.stop(0)


# ---- model fingerprint --------------------------------------------------------------------


def write_checkpoint(root, tensors, config=None, split=False):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or {"hidden_size": 8, "model": "x"}))
    if split:
        names = sorted(tensors)
        save_file({n: tensors[n] for n in names[:1]}, str(root / "model-1.safetensors"))
        save_file({n: tensors[n] for n in names[1:]}, str(root / "model-2.safetensors"))
    else:
        save_file(tensors, str(root / "model.safetensors"))
    return root


def test_fingerprint_covers_config_names_dtypes_and_shapes_not_file_split(tmp_path):
    tensors = {"a.weight": np.zeros((4, 8), np.float32), "b.bias": np.zeros(8, np.float16)}
    base = model_fingerprint(write_checkpoint(tmp_path / "base", tensors))
    assert len(base) == 16 and int(base, 16) >= 0
    assert model_fingerprint(write_checkpoint(tmp_path / "split", tensors, split=True)) == base
    reordered = {"hidden_size": 8, "model": "x"}  # same JSON, other key order
    assert model_fingerprint(write_checkpoint(tmp_path / "keys", tensors, reordered)) == base
    variants = {
        "config": ({**tensors}, {"hidden_size": 9, "model": "x"}),
        "shape": ({**tensors, "b.bias": np.zeros(9, np.float16)}, None),
        "dtype": ({**tensors, "b.bias": np.zeros(8, np.float32)}, None),
        "name": ({"a.weight": tensors["a.weight"], "c.bias": tensors["b.bias"]}, None),
    }
    for name, (variant, config) in variants.items():
        fingerprint = model_fingerprint(write_checkpoint(tmp_path / name, variant, config))
        assert fingerprint != base, name


def test_fingerprint_reads_headers_only(tmp_path):
    tensors = {"a.weight": np.ones((4, 8), np.float32)}
    root = write_checkpoint(tmp_path / "ckpt", tensors)
    before = model_fingerprint(root)
    path = root / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # weights changed, header untouched
    path.write_bytes(bytes(data))
    assert model_fingerprint(root) == before


def test_fingerprint_needs_a_config_and_safetensors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        model_fingerprint(tmp_path)
