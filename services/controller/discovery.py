"""Who should be in the cluster, read from the Kubernetes API when the controller runs in one.

The release's attention and FFN StatefulSets (label `app.kubernetes.io/component`) give the
cluster's size: their `spec.replicas`, read at start and followed with a watch, so scaling
either one resizes the registry (which opens a new membership epoch as members join or
leave). The release's pods are watched too: a pod that is deleted or has failed takes its
member out at once, rather than after the member timeout (a pod killed without draining).

Members still register themselves over gRPC (their address, model fingerprint and epoch);
discovery only says how many places there are and which pods are gone. Outside a cluster the
controller's command line gives the size and nothing here runs.

Uses the official `kubernetes` client: list, then watch; list again when a watch ends or
fails. Labels are checked here too, so a server that ignores the selector changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import urllib3
from kubernetes import client, config, watch

from services.common.cluster import ATTENTION, FFN, ROLES

log = logging.getLogger(__name__)

COMPONENT_LABEL = "app.kubernetes.io/component"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set by the StatefulSet controller (1.28+)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
WATCH_S = 300  # the server ends a watch after this long; it is listed and watched again
RETRY_S = 2.0  # after a failed list or watch
GONE_PHASES = ("Failed", "Succeeded")  # a pod in either runs nothing any more


class ClusterView(Protocol):
    """What discovery tells the registry."""

    def resize(self, num_attention_instances: int, num_ffn_instances: int) -> None: ...

    def gone(self, role: str, index: int, host: str) -> None: ...


@dataclass(frozen=True)
class Target:
    """Where to look: a namespace and the label selector of one release's objects."""

    namespace: str
    selector: str

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError("--kube-namespace must name a namespace")
        if "=" not in self.selector:
            raise ValueError(
                f"--kube-selector must be a label selector such as "
                f"app.kubernetes.io/instance=afd, got {self.selector!r}"
            )

    def matches(self, labels: dict[str, str] | None) -> bool:
        """Equality-based selector terms only (`k=v`, `k==v`, `k!=v`), which is what the
        chart passes."""
        labels = labels or {}
        for term in self.selector.split(","):
            if "!=" in term:
                key, value = (part.strip() for part in term.split("!=", 1))
                if labels.get(key) == value:
                    return False
            else:
                key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
                if labels.get(key) != value:
                    return False
        return True


def default_namespace() -> str:
    """The pod's own namespace, as its service account knows it; "default" elsewhere."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def kubernetes_apis() -> tuple[client.AppsV1Api, client.CoreV1Api]:
    """Clients from the pod's service account in a cluster, else from $KUBECONFIG or
    ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise ValueError(
                "--discovery kubernetes: no Kubernetes API to reach (not in a pod with a "
                f"service account, and no usable kubeconfig: {err})"
            ) from err
    return client.AppsV1Api(), client.CoreV1Api()


class KubernetesDiscovery:
    def __init__(self, apps: client.AppsV1Api, core: client.CoreV1Api, target: Target) -> None:
        self._apps = apps
        self._core = core
        self.target = target
        self._replicas: dict[str, tuple[str, int]] = {}  # StatefulSet name -> (role, replicas)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def size(self, timeout_s: float) -> tuple[int, int]:
        """(attention, FFN) replicas of the release's StatefulSets, listed now; waits (at
        most `timeout_s`) for both to exist."""
        deadline = time.monotonic() + timeout_s
        while True:
            why = (
                f"no attention and FFN StatefulSets (label {COMPONENT_LABEL}) match "
                f"{self.target.selector} in namespace {self.target.namespace}: check "
                "--kube-selector and --kube-namespace"
            )
            try:
                items, _ = self._list(self._apps.list_namespaced_stateful_set)
                self._sync_replicas(items)
            except client.ApiException as err:
                raise ValueError(self._refused("statefulsets", err)) from err
            except (urllib3.exceptions.HTTPError, OSError) as err:  # not up yet, or wrong
                why = f"the Kubernetes API at {self._apps.api_client.configuration.host} "
                why += f"did not answer ({type(err).__name__})"
            size = self._size()
            if size is not None:
                return size
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"after {timeout_s:g} s, {why}")
            time.sleep(min(RETRY_S, left))

    def start(self, view: ClusterView) -> None:
        """Follow the StatefulSets and pods in the background, telling `view` of changes."""

        def on_replicas() -> None:
            size = self._size()
            if size is not None:
                view.resize(*size)

        def on_statefulsets(kind: str | None, objects: Iterable[Any]) -> None:
            if kind is None:
                self._sync_replicas(objects)
            else:
                for obj in objects:
                    self._record_replicas(kind, obj)
            on_replicas()

        def on_pods(kind: str | None, objects: Iterable[Any]) -> None:
            for pod in objects:
                gone = pod_gone(kind, pod)
                if gone is not None:
                    view.gone(*gone)

        for what, lister, handler in (
            ("statefulsets", self._apps.list_namespaced_stateful_set, on_statefulsets),
            ("pods", self._core.list_namespaced_pod, on_pods),
        ):
            thread = threading.Thread(
                target=self._follow, args=(what, lister, handler), name=f"watch-{what}"
            )
            thread.daemon = True  # a blocked watch must not hold the process at exit
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def _follow(
        self,
        what: str,
        lister: Callable[..., Any],
        handle: Callable[[str | None, Iterable[Any]], None],
    ) -> None:
        """List (handle(None, items)), then watch (handle(type, [object])) until the watch
        ends; again, until stopped."""
        while not self._stop.is_set():
            try:
                items, version = self._list(lister)
                handle(None, items)
                stream = watch.Watch().stream(
                    lister,
                    self.target.namespace,
                    label_selector=self.target.selector,
                    resource_version=version,
                    timeout_seconds=WATCH_S,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    obj = event["object"]
                    if self.target.matches(obj.metadata.labels):
                        handle(event["type"], [obj])
            except client.ApiException as err:
                log.warning("%s", self._refused(what, err))
            except Exception as err:  # the API server restarting, a dropped connection
                log.warning("watching %s failed (%s); listing again", what, err)
            self._stop.wait(RETRY_S)

    def _list(self, lister: Callable[..., Any]) -> tuple[list[Any], str | None]:
        """The release's objects of one kind, and the listing's resourceVersion."""
        listing = lister(self.target.namespace, label_selector=self.target.selector)
        items = [o for o in listing.items if self.target.matches(o.metadata.labels)]
        return items, listing.metadata.resource_version

    def _sync_replicas(self, statefulsets: Iterable[Any]) -> None:
        self._replicas = {}
        for obj in statefulsets:
            self._record_replicas("ADDED", obj)

    def _record_replicas(self, kind: str | None, obj: Any) -> None:
        role = (obj.metadata.labels or {}).get(COMPONENT_LABEL)
        if role not in ROLES:
            return
        if kind == "DELETED":
            self._replicas.pop(obj.metadata.name, None)
        elif kind is not None:
            replicas = obj.spec.replicas if obj.spec.replicas is not None else 1
            self._replicas[obj.metadata.name] = (role, replicas)

    def _size(self) -> tuple[int, int] | None:
        """Replicas per role, or None unless exactly one StatefulSet has each role."""
        by_role: dict[str, list[int]] = {role: [] for role in ROLES}
        for role, replicas in self._replicas.values():
            by_role[role].append(replicas)
        if any(len(counts) != 1 for counts in by_role.values()):
            names = {role: len(counts) for role, counts in by_role.items()}
            log.warning(
                "expected one attention and one FFN StatefulSet under %s, found %s: size kept",
                self.target.selector,
                names,
            )
            return None
        attention, ffn = by_role[ATTENTION][0], by_role[FFN][0]
        if attention < 1 or ffn < 1:
            log.warning("a role scaled to zero (%d attention, %d FFN): size kept", attention, ffn)
            return None
        return attention, ffn

    def _refused(self, what: str, err: client.ApiException) -> str:
        where = f"{what} in namespace {self.target.namespace} ({err.status} {err.reason})"
        if err.status in (401, 403):
            return (
                f"the Kubernetes API refused to list {where}: the controller's service account "
                f"needs get, list and watch on {what} there"
            )
        return f"listing {where} failed"


def pod_gone(kind: str | None, pod: Any) -> tuple[str, int, str] | None:
    """(role, index, pod IP) of a pod whose process is gone for good: deleted, or failed."""
    labels = pod.metadata.labels or {}
    role, ip = labels.get(COMPONENT_LABEL), pod.status.pod_ip if pod.status else None
    if role not in ROLES or not ip:
        return None
    if kind != "DELETED" and (pod.status.phase or "") not in GONE_PHASES:
        return None
    index = labels.get(POD_INDEX_LABEL) or pod.metadata.name.rsplit("-", 1)[-1]
    return (role, int(index), ip) if index.isdigit() else None
