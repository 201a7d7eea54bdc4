"""Where the cluster secret comes from, and the rendezvous prefix it makes unguessable."""

from __future__ import annotations

import pytest

from services.common import cluster_secret


def test_the_rendezvous_prefix_depends_on_the_secret_and_the_epoch():
    open_prefix = cluster_secret.rendezvous_prefix(3, None)
    assert open_prefix == "epoch-3"  # an open cluster keeps the plain prefix
    a = cluster_secret.rendezvous_prefix(3, "alpha")
    assert a == cluster_secret.rendezvous_prefix(3, "alpha")  # every member derives the same
    assert a.startswith("epoch-3-") and len(a) == len("epoch-3-") + 32
    assert a != cluster_secret.rendezvous_prefix(3, "beta")
    assert a != cluster_secret.rendezvous_prefix(4, "alpha")


def test_the_secret_comes_from_a_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cluster_secret.ENV, raising=False)
    assert cluster_secret.load(None) is None
    monkeypatch.setenv(cluster_secret.ENV, "from-env")
    assert cluster_secret.load(None) == "from-env"
    path = tmp_path / "secret"
    path.write_text("  from-file \nsecond line ignored\n")
    assert cluster_secret.load(str(path)) == "from-file"
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty: put the secret on line 1"):
        cluster_secret.load(str(path))
    with pytest.raises(ValueError, match="--cluster-secret-file .*missing"):
        cluster_secret.load(str(tmp_path / "missing"))


def test_fresh_secrets_differ():
    assert cluster_secret.new_secret() != cluster_secret.new_secret()
    assert len(cluster_secret.new_secret()) == 64
