"""The benchmark's test bed: a real `bao server -dev` in the runbook layout, the TokenReview stand-in, test CAs.

Built from `testbed/` (the same stand-ins the tests use); nothing here is mocked but the kube-apiserver.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import hvac

from testbed import pki
from testbed.bao import BaoServer
from testbed.kubeapi import KubeAPI
from testbed.vaultsetup import RunbookLayout, ensure_secrets_engine, seed_runbook_layout

__all__ = ["FILES", "KV2_MOUNT", "Testbed"]

#: the four files istiod reads, and the KV keys of the runbook layout they come from
FILES = {"ca-key.pem": "ca_key", "ca-cert.pem": "ca_cert", "root-cert.pem": "root_cert", "cert-chain.pem": "cert_chain"}
#: a KV v2 mount beside the runbook's KV v1 one (bao agent honours static_secret_render_interval only there)
KV2_MOUNT = "bench-kv2"


class Testbed:
    """OpenBao + kube stand-in + a service-account token file + a few distinct valid Istio CA bundles.

    `secret(name)` creates one more secret beside the runbook's (KV v1, or KV v2 in `KV2_MOUNT`), so
    concurrent measurements never see each other's rotations; the runbook policy is widened for that.
    """

    def __init__(self, workdir: Path | None = None, *, n_bundles: int = 2) -> None:
        """Start everything (a few seconds); `close()` stops it."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-")
            workdir = Path(self._tmp.name)
        self.workdir: Path = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kube = KubeAPI().start()
        self.bao = BaoServer().start()
        # RSA 4096 like the runbook's certs (istio's Makefile.selfsigned.mk): key parsing is part of the cost
        rsa = {"key_type": "rsa", "bits": 4096}
        root = pki.root_ca(**rsa)  # type: ignore[arg-type]
        # distinct intermediates under one root: each is a valid bundle, and rotating between them changes
        # every file but root-cert.pem, like a real intermediate rotation. One notBefore for all: rotations
        # cycle back to earlier bundles, and on KV v1 the agent refuses a certificate older than the live one.
        start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
        self.bundles: list[dict[str, bytes]] = [
            pki.istio_ca_files(
                root, pki.intermediate_ca(root, cn=f"Intermediate CA {i}", not_before=start, **rsa)  # type: ignore[arg-type]
            )
            for i in range(n_bundles)
        ]
        self.admin: hvac.Client = self.bao.client()
        self.layout: RunbookLayout = seed_runbook_layout(self.admin, self.kube, self.bundles[0])
        ensure_secrets_engine(self.admin, KV2_MOUNT, kv_version=2)
        self.admin.sys.create_or_update_policy(
            name=self.layout.policy,
            policy=(
                f'path "{self.layout.kv_mount}/*" {{\n  capabilities = ["read"]\n}}\n'
                f'path "{KV2_MOUNT}/data/*" {{\n  capabilities = ["read"]\n}}\n'
                f'path "{KV2_MOUNT}/metadata/*" {{\n  capabilities = ["read"]\n}}\n'
            ),
        )
        token_dir = self.workdir / "serviceaccount"
        token_dir.mkdir(exist_ok=True)
        self.token_path = token_dir / "token"
        # one token for the whole run, valid long enough that no agent has to notice a rotation
        self.token_path.write_text(self.kube.mint_token("istio-system", "istiod", ttl=24 * 3600))
        os.chmod(self.token_path, 0o600)

    @property
    def kv_path(self) -> str:
        """`mount/path` of the runbook's secret (kubernetes-cluster1-secrets/istiod-service/certs)."""
        return f"{self.layout.kv_mount}/{self.layout.secret_path}"

    def secret(self, name: str, *, kv_version: int = 1, bundle_index: int = 0) -> str:
        """Create `MOUNT/bench/NAME/certs` holding bundle `bundle_index`; returns its `mount/path`.

        MOUNT is the runbook's KV v1 mount, or `KV2_MOUNT` for `kv_version=2`.
        """
        mount = self.layout.kv_mount if kv_version == 1 else KV2_MOUNT
        kv_path = f"{mount}/bench/{name}/certs"
        self.write(kv_path, bundle_index)
        return kv_path

    def write(self, kv_path: str, bundle_index: int, client: hvac.Client | None = None) -> None:
        """Write bundle `bundle_index` (its runbook KV keys) to the secret `mount/path` (KV v2 in `KV2_MOUNT`).

        Pass a `client` of your own when writing from several threads (an hvac session is not thread-safe).
        """
        mount, _, path = kv_path.partition("/")
        files = self.bundles[bundle_index]
        data = {key: files[name].decode("ascii") for name, key in FILES.items()}
        kv = (client or self.admin).secrets.kv
        if mount == KV2_MOUNT:
            kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        else:
            kv.v1.create_or_update_secret(path=path, secret=data, mount_point=mount)

    def close(self) -> None:
        """Stop OpenBao and the kube stand-in and remove the temp dir."""
        self.bao.close()
        self.kube.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
