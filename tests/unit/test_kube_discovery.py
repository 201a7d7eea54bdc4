"""The controller's view of its release in Kubernetes: the size is the StatefulSets'
replicas and follows a scale; a deleted or failed pod takes its member out; another
release's objects change nothing. The official `kubernetes` client against kmock's API
emulator (no real API server runs here); the registry side is a recorder."""

from __future__ import annotations

import threading
import time

import pytest

from services.controller.discovery import KubernetesDiscovery, Target
from tests.support.kube_api import NAMESPACE, SELECTOR, KubeAPI


class Recorder:
    """A ClusterView that remembers what it was told."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []
        self.removed: list[tuple[str, int, str]] = []
        self._told = threading.Condition()

    def resize(self, num_attention: int, num_ffn: int) -> None:
        with self._told:
            self.sizes.append((num_attention, num_ffn))
            self._told.notify_all()

    def gone(self, role: str, index: int, host: str) -> None:
        with self._told:
            self.removed.append((role, index, host))
            self._told.notify_all()

    def wait_for(self, condition, timeout_s: float = 10.0) -> None:
        with self._told:
            assert self._told.wait_for(condition, timeout_s), (self.sizes, self.removed)


@pytest.fixture
def api():
    with KubeAPI() as api:
        api.statefulset("attention", 2)
        api.statefulset("ffn", 2)
        api.statefulset("ffn", 5, release="other")  # another release in the namespace
        api.pod("attention", 0, "10.0.0.6")
        yield api


@pytest.fixture
def followed(api):
    discovery = KubernetesDiscovery(api.apps, api.core, Target(NAMESPACE, SELECTOR))
    view = Recorder()
    discovery.start(view)
    view.wait_for(lambda: view.sizes)
    yield api, view
    discovery.stop()


def test_the_size_is_the_release_statefulsets_replicas(api):
    discovery = KubernetesDiscovery(api.apps, api.core, Target(NAMESPACE, SELECTOR))
    assert discovery.size(timeout_s=5) == (2, 2)


def test_scaling_either_statefulset_resizes_the_cluster(followed):
    api, view = followed
    assert view.sizes[-1] == (2, 2)
    api.scale("attention", 4)
    view.wait_for(lambda: view.sizes[-1] == (4, 2))
    api.scale("ffn", 3)
    view.wait_for(lambda: view.sizes[-1] == (4, 3))


def test_a_deleted_or_failed_pod_takes_its_member_out_and_a_running_one_does_not(followed):
    api, view = followed
    api.pod("attention", 1, "10.0.0.7")
    api.pod("ffn", 0, "10.0.0.8")
    api.delete_pod("attention", 1)
    view.wait_for(lambda: ("attention", 1, "10.0.0.7") in view.removed)
    api.fail_pod("ffn", 0)
    view.wait_for(lambda: ("ffn", 0, "10.0.0.8") in view.removed)
    api.pod("ffn", 1, "10.0.0.9")
    time.sleep(0.5)
    assert view.removed == [("attention", 1, "10.0.0.7"), ("ffn", 0, "10.0.0.8")]


def test_missing_statefulsets_are_named_with_what_to_check():
    with KubeAPI() as api:
        api.statefulset("attention", 1)
        discovery = KubernetesDiscovery(api.apps, api.core, Target(NAMESPACE, SELECTOR))
        with pytest.raises(ValueError, match="check --kube-selector and --kube-namespace"):
            discovery.size(timeout_s=0.5)


def test_a_selector_must_name_labels():
    with pytest.raises(ValueError, match="label selector"):
        Target(NAMESPACE, "afd")
    assert Target(NAMESPACE, "a=b,c!=d").matches({"a": "b", "c": "e"})
    assert not Target(NAMESPACE, "a=b,c!=d").matches({"a": "b", "c": "d"})
