"""A Kubernetes API for tests: kmock's emulator (no real API server can run on these
machines), served on 127.0.0.1 from a background thread, and the official client on it.

The emulator stores what is created and patched and streams watch events, but ignores label
selectors (the discovery code filters labels itself) and runs no controllers: a test plays
the StatefulSet controller by creating and deleting the pods."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import kmock
from kubernetes import client

NAMESPACE = "serving"
RELEASE = "afd"
SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=afd"


def labels(role: str, release: str = RELEASE) -> dict[str, str]:
    return {
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/name": "afd",
        "app.kubernetes.io/component": role,
    }


class KubeAPI:
    """The emulator, for the duration of a `with` block."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    def __enter__(self) -> KubeAPI:
        self._thread.start()
        assert self._ready.wait(30), "the Kubernetes API emulator did not start"
        configuration = client.Configuration()
        configuration.host = self.url
        api = client.ApiClient(configuration)
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stopped is not None
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stopped.wait()
            # Watches stream until their client goes: end them, or shutting down waits.
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig naming this API, for processes started with KUBECONFIG=path."""
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: test, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: test, user: {token: test}}]\n"
            "contexts: [{name: test, context: {cluster: test, user: test, "
            f"namespace: {NAMESPACE}}}}}]\n"
        )
        return path

    def statefulset(self, role: str, replicas: int, release: str = RELEASE) -> None:
        name = f"{release}-{role}"
        pod_labels = {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": role}
        body = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels(role, release)},
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                "selector": {"matchLabels": pod_labels},
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {"containers": [{"name": role, "image": "afd"}]},
                },
            },
        }
        self.apps.create_namespaced_stateful_set(NAMESPACE, body)

    def scale(self, role: str, replicas: int) -> None:
        """What `kubectl scale statefulset` changes."""
        body = {"spec": {"replicas": replicas}}
        self.apps.patch_namespaced_stateful_set(f"{RELEASE}-{role}", NAMESPACE, body)

    def pod(self, role: str, index: int, ip: str, phase: str = "Running") -> None:
        name = f"{RELEASE}-{role}-{index}"
        pod_labels = {**labels(role), "apps.kubernetes.io/pod-index": str(index)}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": pod_labels},
            "spec": {"containers": [{"name": role, "image": "afd"}]},
            "status": {"phase": phase, "podIP": ip},
        }
        self.core.create_namespaced_pod(NAMESPACE, body)

    def fail_pod(self, role: str, index: int) -> None:
        body = {"status": {"phase": "Failed"}}
        self.core.patch_namespaced_pod(f"{RELEASE}-{role}-{index}", NAMESPACE, body)

    def delete_pod(self, role: str, index: int) -> None:
        self.core.delete_namespaced_pod(f"{RELEASE}-{role}-{index}", NAMESPACE)
