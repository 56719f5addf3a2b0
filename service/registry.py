"""Registered model specs, per tenant, persisted next to the disk tier.

A spec's *model id* is the hex of its fingerprint (64 characters): deterministic, so a client
registering the same spec again (after a restart, on another instance) gets the same id. A
tenant may use a model id only once it registered that spec itself, so the registry does not tell
one tenant which models another uses. The file (``specs.json``) is rewritten atomically on every
new registration; on start the store is told every spec again, which re-adopts the blocks the
disk tier kept.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from kvtier.kvstore import KVSpec

from .errors import NotFound, TooManyRequests

log = logging.getLogger(__name__)


class SpecRegistry:
    def __init__(self, path: Path | None, max_specs: int, max_specs_per_tenant: int | None = None) -> None:
        self.path = path
        self.max_specs = max_specs
        self.max_specs_per_tenant = max_specs_per_tenant
        self._lock = threading.Lock()
        self._specs: dict[str, KVSpec] = {}  # model id -> spec
        self._tenants: dict[str, set[str]] = {}  # model id -> tenants that registered it
        self._by_short_fingerprint: dict[str, str] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            entries = json.loads(path.read_text())["specs"]
            for e in entries:
                spec = KVSpec.from_dict(e["spec"])
                self._add(spec, set(e["tenants"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"the spec registry {path} is unreadable ({e}); move it away to start empty") from None

    def _add(self, spec: KVSpec, tenants: set[str]) -> str:
        model = spec.fingerprint.hex()
        self._specs[model] = spec
        self._tenants.setdefault(model, set()).update(tenants)
        self._by_short_fingerprint[spec.short_fingerprint] = model
        return model

    def _save(self) -> None:  # under self._lock
        if self.path is None:
            return
        data = {"specs": [{"spec": s.to_dict(), "tenants": sorted(self._tenants[m])} for m, s in self._specs.items()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".specs-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def register(self, tenant: str, spec: KVSpec) -> tuple[str, bool]:
        """(model id, whether the spec is new to the store)."""
        model = spec.fingerprint.hex()
        with self._lock:
            new = model not in self._specs
            mine = not new and tenant in self._tenants[model]
            if (
                not mine
                and self.max_specs_per_tenant is not None
                and sum(tenant in ts for ts in self._tenants.values()) >= self.max_specs_per_tenant
            ):
                raise TooManyRequests(
                    f"this tenant registered {self.max_specs_per_tenant} specs already (max_specs_per_tenant); "
                    "unregister one with DELETE /v1/specs/{model}",
                    field="spec",
                )
            if new and len(self._specs) >= self.max_specs:
                raise TooManyRequests(f"{self.max_specs} specs are registered already (max_specs)", field="spec")
            if new or tenant not in self._tenants[model]:
                self._add(spec, {tenant})
                self._save()
            return model, new

    def unregister(self, tenant: str, model: str) -> bool:
        """Forget ``tenant``'s registration of ``model``; the spec itself goes once no tenant has it.
        Returns whether the spec went (its blocks are then no longer reachable and age out of the tiers)."""
        with self._lock:
            self.get(tenant, model)  # NotFound unless this tenant registered it
            self._tenants[model].discard(tenant)
            gone = not self._tenants[model]
            if gone:
                spec = self._specs.pop(model)
                del self._tenants[model]
                self._by_short_fingerprint.pop(spec.short_fingerprint, None)
            self._save()
            return gone

    def get(self, tenant: str, model: str) -> KVSpec:
        spec = self._specs.get(model) if isinstance(model, str) else None
        if spec is None or tenant not in self._tenants.get(model, ()):
            raise NotFound(
                f"model {str(model)[:80]!r} is not registered for this tenant: register its spec with POST /v1/specs first", field="model"
            )
        return spec

    def models_of(self, tenant: str) -> dict[str, KVSpec]:
        with self._lock:
            return {m: s for m, s in self._specs.items() if tenant in self._tenants[m]}

    def all_specs(self) -> list[KVSpec]:
        with self._lock:
            return list(self._specs.values())

    def model_of_short_fingerprint(self, short_fingerprint: str) -> str | None:
        return self._by_short_fingerprint.get(short_fingerprint)

    def spec_of_short_fingerprint(self, short_fingerprint: str) -> KVSpec | None:
        with self._lock:
            model = self._by_short_fingerprint.get(short_fingerprint)
            return self._specs.get(model) if model is not None else None
