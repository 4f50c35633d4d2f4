"""Scenario services: what runs on the parent beside the enclaves for a whole scenario case.

A scenario's top-level ``services:`` block (docs/scenarios.md#services) starts, before the first
step and until the case ends, a KMS emulator (:mod:`.kms`) and vsock-proxies
(:mod:`.vsock_proxy`). Every enclave the case starts gets the proxies' listeners on its vsock
device before its QEMU starts; the declared KMS keys are created before the first enclave boots
(their policies may name the PCRs of the scenario's EIF, which a step may have built) or when
a step first names one. Their logs go to ``<artifacts>/services/``; steps read their values
as ``${kms.*}`` placeholders (:mod:`.placeholders`). The ``kms`` step starts the same two
services for itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import NitroError
from harness.scenario.errors import StepFailed, display_path
from harness.scenario.services.kms import KmsEmulator, KmsServiceError
from harness.scenario.services.placeholders import eif_pcr, substitute
from harness.scenario.services.vsock_proxy import ProxyServiceError, VsockProxyService

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


class ScenarioServices:
    """The services of one scenario case (``runner.scenario.data["services"]``).

    :meth:`start` starts the emulator and checks each proxy; :meth:`on_vsock` (an
    ``EnclaveFactory.vsock_hooks`` entry) attaches the proxies to an enclave;
    :meth:`ensure_keys` creates the declared keys once; :meth:`value` answers ``${kms.*}``;
    :meth:`stop` stops everything and returns problems. Errors are StepFailed naming the
    scenario file, the line and the ``services...`` path.
    """

    def __init__(self, runner: ScenarioRunner):
        self.runner = runner
        self.spec: dict[str, Any] = runner.scenario.data["services"]
        self.folder = runner.artifacts_dir / "services"
        kms = self.spec.get("kms")
        self.kms: KmsEmulator | None = None
        if kms is not None:
            tls_dir = None
            if kms.get("tls_dir"):
                tls_dir = Path(self._resolve(kms["tls_dir"], ["kms", "tls_dir"]))
                tls_dir = tls_dir if tls_dir.is_absolute() else runner.scenario.path.parent / tls_dir
            # Keys are resolved when they are created: their policies may name the EIF's PCRs.
            settings = self._resolve({k: v for k, v in kms.items() if k != "keys"}, ["kms"])
            self.kms = KmsEmulator(settings | {"keys": kms.get("keys")}, self.folder, tls_dir=tls_dir)
        self.proxies = [VsockProxyService(self._resolve(p, ["vsock_proxy", i]), self.folder, self.kms)
                        for i, p in enumerate(self.spec.get("vsock_proxy") or [])]

    def start(self) -> None:
        """Start the emulator, then check every proxy's remote and allowlist."""
        if self.kms is not None:
            try:
                self.kms.start()
            except NitroError as err:
                raise self._error(["kms"], err.message) from None
        for index, proxy in enumerate(self.proxies):
            try:
                proxy.check()
            except ProxyServiceError as err:
                raise self._error(["vsock_proxy", index, *err.at], err.message) from None

    def ensure_keys(self, config: Any = None) -> None:
        """Create the declared keys (once); an ``EnclaveFactory.start_hooks`` entry."""
        if self.kms is None or self.kms.keys_created:
            return
        try:
            self.kms.create_declared_keys(lambda node, at: self._resolve(node, ["kms", *at]))
        except KmsServiceError as err:
            raise self._error(["kms", *err.at], err.message) from None

    def on_vsock(self, device: Any) -> None:
        """Attach every proxy to an enclave's vsock device (before its QEMU starts)."""
        for index, proxy in enumerate(self.proxies):
            try:
                proxy.attach(device)
            except NitroError as err:
                raise self._error(["vsock_proxy", index, "port"], err.message) from None

    def value(self, name: str) -> str | None:
        """The value of a ``${kms.*}`` placeholder, None when there is no such value; naming a
        key creates the declared keys first."""
        if self.kms is None or not name.startswith("kms."):
            return None
        if name.startswith("kms.keys."):
            self.ensure_keys()
        return self.kms.placeholders().get(name)

    def stop(self) -> list[str]:
        """Stop the proxies, then the emulator; return problems (none expected)."""
        problems = []
        for proxy in self.proxies:
            try:
                proxy.stop()
            except Exception as exc:  # keep stopping the others
                problems.append(f"services: vsock-proxy {proxy.port}: {exc}")
        if self.kms is not None:
            try:
                self.kms.stop()
            except Exception as exc:
                problems.append(f"services: kms: {exc}")
        return problems

    # -- helpers

    def _resolve(self, node: Any, at: list[Any]) -> Any:
        """``node`` with the placeholders a services block may use substituted."""
        def lookup(name: str, where: list[Any]) -> str:
            if name.startswith("eif.pcr"):
                try:
                    return eif_pcr(self.runner, name)
                except StepFailed as err:
                    raise self._error(where, err.message) from None
            if name.startswith("kms."):
                if self.kms is None:
                    raise self._error(where, f"${{{name}}} has no value before services.kms starts")
                return self.kms.placeholders()[name] if self.kms.identity else _early_kms(self.kms, name)
            return {"artifacts": str(self.runner.artifacts_dir), "scenario": self.runner.scenario.name,
                    "scenario_dir": str(self.runner.scenario.path.parent.resolve())}[name]

        return substitute(node, lookup, at)

    def _error(self, at: list[Any], message: str) -> StepFailed:
        from harness.scenario.loader import _dotted, line_of

        path = ["services", *at]
        line = line_of(self.runner.scenario.data, path)
        return StepFailed(f"{display_path(self.runner.scenario.path)}:{line}: {_dotted(path)}: {message}")


def _early_kms(kms: KmsEmulator, name: str) -> str:
    """``kms.region``, ``kms.account_id``, ``kms.principal_arn`` before the emulator started."""
    return {"kms.region": kms.region, "kms.account_id": kms.account_id,
            "kms.principal_arn": kms.credential.principal_arn}[name]


def start_services(runner: ScenarioRunner) -> ScenarioServices | None:
    """Start the case's ``services:`` (None without the block): the emulator and proxy checks
    now, keys before the first enclave starts, proxies on every enclave; everything stopped
    when the case ends (after its enclaves). Raises StepFailed naming the failing entry."""
    if not runner.scenario.data.get("services"):
        return None
    services = ScenarioServices(runner)
    runner.on_close(services.stop)
    services.start()
    runner.factory.start_hooks.append(services.ensure_keys)
    runner.factory.vsock_hooks.append(services.on_vsock)
    return services


__all__ = ["KmsEmulator", "ScenarioServices", "VsockProxyService", "start_services"]
