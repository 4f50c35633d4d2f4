"""pytest plugin (entry point ``nitro_harness``): enclave fixtures, markers and YAML scenario items.

Modelled on Firecracker's test framework (one object owns a VM's life, staged fixtures
``eif`` -> ``enclave``, artifacts kept only when the test failed, verified teardown) and QEMU's
functional tests (an output folder per test printed on failure, accelerator requirements that
skip with the reason).

- Collection: every ``*.yaml``/``*.yml`` under a directory named ``scenarios`` (and any YAML file
  named on the command line) becomes one test item per scenario document and matrix case.
- Fixtures: ``enclave_factory`` (a function starting enclaves; all terminated at teardown),
  ``enclave`` (one booted enclave, configured by the ``enclave(...)`` marker or indirect
  parametrization), ``eif`` (the EIF path), ``nsm`` (the enclave's NSM), ``parent_vsock`` (the
  parent's vsock endpoints of that enclave), ``nitro_artifacts`` (the test's artifacts folder).
- Markers: ``enclave(image=..., eif=..., memory_mib=..., cpu_count=..., ...)``, ``requires_kvm``,
  ``requires_nsm`` (skipped with the doctor's reason).
- Options: ``--qemu``, ``--accel``, ``--keep-artifacts``, ``--artifacts-dir``, ``--kernel``, ``--arch``,
  ``--recipes DIR`` (and ini ``nitro_harness_recipes``: the user's recipe folders, searched before
  the shipped ones), ``--shard-id K --num-shards N`` (:mod:`harness.pytest_shard`).
- EIF paths (``enclave(eif=...)``, a scenario's ``eif:``) are tried relative to the test or
  scenario file's folder, then to pytest's rootdir.
- pytest-xdist: each worker gets its own runtime directory (so ``terminate-enclave --all`` in one
  worker never touches another's enclaves) and its own CID range.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import assets, pytest_shard
from harness import scenario as scn
from harness.enclave_factory import (
    DEFAULT_ENCLAVE,
    EnclaveFactory,
    ParentListener,
    RunningEnclave,
    resolve_eif,
)
from harness.errors import NitroError

#: Default image of the ``enclave``/``eif`` fixtures: the hello image.
DEFAULT_IMAGE = "hello"

#: First CID of xdist worker N's range is CID_RANGE_BASE + N * CID_RANGE_SIZE (below that, the
#: engine's own auto-assignment from 16 serves runs without xdist).
CID_RANGE_BASE = 1000
CID_RANGE_SIZE = 1000

_ARTIFACTS_KEY = pytest.StashKey[Path]()
_REPORTS_KEY = pytest.StashKey[dict]()
_SKIP_CACHE_KEY = pytest.StashKey[dict]()
_CIDS_KEY = pytest.StashKey[Iterator[int]]()


# --------------------------------------------------------------------------------------------
# Options, markers, per-worker set-up


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the plugin's command-line options (group ``nitro-harness``)."""
    group = parser.getgroup("nitro-harness", "Nitro Enclaves in QEMU")
    group.addoption("--qemu", metavar="PATH", default=None,
                    help="QEMU binary to boot enclaves with (default: NITRO_HARNESS_QEMU or the doctor's choice)")
    group.addoption("--accel", choices=("kvm", "tcg"), default=None,
                    help="accelerator (default: KVM only where vmx/svm and a probe boot work, else TCG)")
    group.addoption("--keep-artifacts", action="store_true", default=False,
                    help="keep every test's artifacts folder, not only those of failed tests")
    group.addoption("--artifacts-dir", metavar="DIR", default=None,
                    help="where per-test artifacts folders go (default: under pytest's basetemp)")
    group.addoption("--kernel", action="append", choices=scn.KERNELS, default=None, dest="nitro_kernels",
                    help="run YAML scenarios on this kernel (repeatable): nitro = the harness's "
                         "Nitro-style kernel, debian = Debian's cloud kernel (recipe <image>-debian); "
                         "default: the nitro_harness_kernels ini value, else nitro")
    parser.addini("nitro_harness_kernels", type="args", default=["nitro"],
                  help="kernels YAML scenarios run on when --kernel is not given (nitro, debian)")
    group.addoption("--arch", action="append", choices=scn.ARCHES, default=None, dest="nitro_arches",
                    help="run YAML scenarios on this architecture (repeatable): x86_64, or aarch64 "
                         "(Graviton: the recipe <image>-arm64 on QEMU's virt machine, under TCG "
                         "on an x86_64 host); default: the nitro_harness_arches ini value, else x86_64")
    parser.addini("nitro_harness_arches", type="args", default=["x86_64"],
                  help="architectures YAML scenarios run on when --arch is not given (x86_64, aarch64)")
    group.addoption("--recipes", action="append", metavar="DIR", default=None, dest="nitro_recipes",
                    help="a folder of the user's image recipes (repeatable), searched before "
                         "the shipped recipes and those of the nitro_harness_recipes ini option")
    parser.addini("nitro_harness_recipes", type="paths", default=[],
                  help="folders of the user's image recipes (relative to the ini file), searched "
                       "before the shipped recipes")
    pytest_shard.add_options(group)


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers; give an xdist worker its own runtime directory and CID range."""
    config.addinivalue_line(
        "markers", "enclave(image=None, eif=None, **settings): settings of the `enclave` fixture "
        "(memory_mib, cpu_count, cpu_ids, cid, debug_mode, name, parent_role_arn, instance_id, ...)")
    config.addinivalue_line("markers", "requires_kvm: skip unless enclaves run under KVM on this host")
    config.addinivalue_line("markers", "requires_nsm: skip unless this QEMU can host the harness NSM")
    config.addinivalue_line("markers", "scenario: a YAML scenario collected by nitro-harness")
    config.addinivalue_line("markers", "slow: boots a real QEMU guest (every YAML scenario has it)")
    config.stash[_SKIP_CACHE_KEY] = {}
    unknown = [k for k in config.getini("nitro_harness_kernels") if k not in scn.KERNELS]
    if unknown or not config.getini("nitro_harness_kernels"):
        raise pytest.UsageError(f"ini option nitro_harness_kernels: {unknown or 'empty'}: "
                                f"each must be one of {', '.join(scn.KERNELS)}")
    unknown = [a for a in config.getini("nitro_harness_arches") if a not in scn.ARCHES]
    if unknown or not config.getini("nitro_harness_arches"):
        raise pytest.UsageError(f"ini option nitro_harness_arches: {unknown or 'empty'}: "
                                f"each must be one of {', '.join(scn.ARCHES)}")
    here = Path(config.invocation_params.dir)
    recipe_dirs = [*(here / d for d in config.getoption("nitro_recipes") or []),
                   *config.getini("nitro_harness_recipes")]
    try:
        # Through the environment: nitro-harness commands that scenario steps run see them too.
        assets.add_recipe_dirs(recipe_dirs)
    except ValueError as err:
        raise pytest.UsageError(f"--recipes / nitro_harness_recipes: {err}") from None
    pytest_shard.chosen_shard(config)  # a usage error before collection
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        index = int(re.sub(r"\D", "", worker) or 0)
        if not os.environ.get("NITRO_HARNESS_RUNTIME_DIR"):
            from harness.registry import runtime_dir

            private = runtime_dir() / f"pytest-{worker}"
            private.mkdir(mode=0o700, exist_ok=True)
            # Child processes (cli steps, nitro-harness commands) inherit it and find our enclaves.
            os.environ["NITRO_HARNESS_RUNTIME_DIR"] = str(private)
        start = CID_RANGE_BASE + index * CID_RANGE_SIZE
        config.stash[_CIDS_KEY] = iter(range(start, start + CID_RANGE_SIZE))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--shard-id K --num-shards N``, keep only shard K's items (the others deselected)."""
    pytest_shard.deselect_other_shards(config, items)


def _eif_bases(request: pytest.FixtureRequest) -> list[Path]:
    """Folders a relative ``eif=`` path is tried against: the test file's, then the rootdir."""
    return [Path(str(request.node.path)).parent, request.config.rootpath]


def _kernels(config: pytest.Config) -> list[str]:
    """Kernels every scenario case runs on: ``--kernel`` values, else the ini's, deduplicated."""
    chosen = config.getoption("nitro_kernels") or config.getini("nitro_harness_kernels")
    return list(dict.fromkeys(chosen))


def _arches(config: pytest.Config) -> list[str]:
    """Architectures every scenario case runs on: ``--arch`` values, else the ini's, deduplicated."""
    chosen = config.getoption("nitro_arches") or config.getini("nitro_harness_arches")
    return list(dict.fromkeys(chosen))


def _artifacts_root(config: pytest.Config) -> Path:
    if _ARTIFACTS_KEY in config.stash:
        return config.stash[_ARTIFACTS_KEY]
    option = config.getoption("--artifacts-dir")
    if option:
        root = Path(option).resolve()
    else:
        try:
            root = config._tmp_path_factory.getbasetemp() / "nitro-artifacts"  # type: ignore[attr-defined]
        except AttributeError:  # the tmp_path plugin disabled (-p no:tmpdir)
            root = Path(tempfile.mkdtemp(prefix="nitro-artifacts-"))
    root.mkdir(parents=True, exist_ok=True)
    config.stash[_ARTIFACTS_KEY] = root
    return root


def artifacts_dir_for(item: pytest.Item) -> Path:
    """The artifacts folder of ``item`` (created empty): ``<root>/<node id made file-safe>``."""
    if _ARTIFACTS_KEY in item.stash:
        return item.stash[_ARTIFACTS_KEY]
    safe = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", item.nodeid).strip("_")[-150:]
    path = _artifacts_root(item.config) / safe
    shutil.rmtree(path, ignore_errors=True)  # a previous run's files would mislead
    path.mkdir(parents=True, exist_ok=True)
    item.stash[_ARTIFACTS_KEY] = path
    return path


def _cids(config: pytest.Config) -> Iterator[int] | None:
    return config.stash.get(_CIDS_KEY, None)


# --------------------------------------------------------------------------------------------
# Requirements and artifacts bookkeeping


def _skip_reason(config: pytest.Config, requirement: str, arch: str) -> str | None:
    cache = config.stash[_SKIP_CACHE_KEY]
    if (requirement, arch) not in cache:
        cache[requirement, arch] = scn.requirement_skip_reason(
            requirement, qemu=config.getoption("--qemu"), accel=config.getoption("--accel"),
            arch=arch)
    return cache[requirement, arch]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip items marked ``requires_kvm``/``requires_nsm`` when the host lacks them (doctor's reason)."""
    for requirement in ("kvm", "nsm"):
        if item.get_closest_marker(f"requires_{requirement}") is not None:
            scenario = getattr(item, "scenario", None)  # a YAML case has an architecture
            reason = _skip_reason(item.config, requirement, getattr(scenario, "arch", "x86_64"))
            if reason:
                # Reported at the test's own location, as pytest's skipif marker does.
                raise pytest.skip.Exception(reason, _use_item_location=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Record each phase's outcome; print the artifacts path on failure; drop it after a pass.

    The path goes into the report's sections (shown with the failure) and into
    ``user_properties`` (a JUnit ``<property name="artifacts">``).
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    reports = item.stash.setdefault(_REPORTS_KEY, {})
    reports[report.when] = report
    path = item.stash.get(_ARTIFACTS_KEY, None)
    if path is None:
        return
    if report.failed:
        if not isinstance(item, ScenarioItem):  # a scenario's own report already ends with it
            report.sections.append(("nitro-harness artifacts", str(path)))
        if ("artifacts", str(path)) not in report.user_properties:
            report.user_properties.append(("artifacts", str(path)))
            item.user_properties.append(("artifacts", str(path)))
    if report.when == "teardown":
        failed = any(r.failed for r in reports.values())
        if not failed and not item.config.getoption("--keep-artifacts"):
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def nitro_artifacts(request: pytest.FixtureRequest) -> Path:
    """This test's artifacts folder (kept when the test fails or with --keep-artifacts)."""
    return artifacts_dir_for(request.node)


@pytest.fixture
def enclave_factory(request: pytest.FixtureRequest, nitro_artifacts: Path) -> Iterator[Callable[..., RunningEnclave]]:
    """A function starting enclaves: ``enclave_factory(image="hello", memory_mib=512, ...)`` or
    ``enclave_factory(EnclaveConfig(...))`` -> a running ``harness.enclave.Enclave``.

    Every enclave started is terminated at teardown, and the teardown fails if a QEMU process
    survives. Boot failures raise the engine's NitroError (E36 with the console tail, ...).
    """
    config = request.config
    factory = EnclaveFactory(nitro_artifacts, qemu=config.getoption("--qemu"),
                                 accel=config.getoption("--accel"), cids=_cids(config))

    def start(enclave_config: Any = None, /, **settings: Any) -> RunningEnclave:
        if enclave_config is None and "image" not in settings and "eif" not in settings:
            settings["image"] = DEFAULT_IMAGE
        return factory.start(enclave_config, **settings)

    start.factory = factory  # type: ignore[attr-defined]
    yield start
    problems = factory.close()
    if problems:
        pytest.fail("enclave teardown: " + "; ".join(problems), pytrace=False)


def _enclave_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings from the closest ``enclave(...)`` marker, overridden by indirect parametrization."""
    settings: dict[str, Any] = {}
    marker = request.node.get_closest_marker("enclave")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("the enclave marker takes keyword arguments only")
        settings.update(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        settings.update(param)
    elif param is not None:
        raise pytest.UsageError(f"indirect 'enclave' parameters must be dicts of settings, got {param!r}")
    return settings


@pytest.fixture
def eif(request: pytest.FixtureRequest) -> Path:
    """Path of the EIF the test's enclave boots (marker/param ``image=`` recipe or ``eif=`` path)."""
    settings = _enclave_settings(request)
    return resolve_eif(settings.get("image", None if "eif" in settings else DEFAULT_IMAGE),
                       settings.get("eif"), _eif_bases(request))


@pytest.fixture
def enclave(request: pytest.FixtureRequest, enclave_factory: Callable[..., RunningEnclave]) -> RunningEnclave:
    """A booted enclave (defaults: hello image, 2 vCPUs, 512 MiB, debug mode), terminated after.

    Configure with ``@pytest.mark.enclave(image="python", memory_mib=1024)`` or
    ``@pytest.mark.parametrize("enclave", [{"cpu_count": 1}], indirect=True)``.
    """
    settings = dict(DEFAULT_ENCLAVE) | _enclave_settings(request)
    if "cpu_ids" in settings and "cpu_count" not in _enclave_settings(request):
        settings.pop("cpu_count")
    image, eif_path = settings.pop("image", None), settings.pop("eif", None)
    path = resolve_eif(image or (None if eif_path else DEFAULT_IMAGE), eif_path, _eif_bases(request))
    return enclave_factory(eif=path, **settings)


@pytest.fixture
def nsm(enclave: RunningEnclave) -> Any:
    """The enclave's emulated NSM (``harness.nsm.Nsm``); skips when this QEMU cannot host it."""
    if enclave.nsm is None:
        pytest.skip(f"no NSM in this enclave: {getattr(enclave, 'nsm_status', 'unknown reason')}")
    return enclave.nsm


class ParentVsock:
    """The parent's (CID 3) vsock endpoints of one enclave, as a test sees them.

    ``connect(port, timeout=10)`` -> a connected socket to the enclave's ``port``;
    ``listen(port)`` -> a listener whose ``accept(timeout)`` returns the guest's connection.
    """

    def __init__(self, enclave: RunningEnclave):
        self.enclave = enclave

    @property
    def cid(self) -> int:
        """The enclave's CID (what the guest sees as its own)."""
        return self.enclave.cid

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """Connect to the enclave's vsock ``port``; raises OSError when refused (RST)."""
        return self.enclave.vsock_connect(port, timeout=timeout)

    def listen(self, port: int) -> ParentListener:
        """Listen on the parent's vsock ``port`` for the enclave to connect to CID 3."""
        return self.enclave.vsock_listen(port)


@pytest.fixture
def parent_vsock(enclave: RunningEnclave) -> ParentVsock:
    """The parent's vsock endpoints of the ``enclave`` fixture."""
    return ParentVsock(enclave)


# --------------------------------------------------------------------------------------------
# YAML scenarios as test items


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect YAML scenario files: under a ``scenarios`` directory, or named on the command line."""
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    if "scenarios" in file_path.parts[:-1] or _named_on_command_line(parent.config, file_path):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _named_on_command_line(config: pytest.Config, file_path: Path) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        candidate = (base / arg.split("::")[0]).resolve()
        if candidate == file_path.resolve():
            return True
    return False


class ScenarioFile(pytest.File):
    """A YAML file of scenarios; validated at collection, before anything boots."""

    def collect(self) -> Iterator[pytest.Item]:
        """One :class:`ScenarioItem` per scenario document and matrix case."""
        try:
            scenarios = scn.load_scenarios(self.path, kernels=_kernels(self.config),
                                           arches=_arches(self.config))
        except NitroError as err:
            # CollectError prints just this line (file:line: key: rule), no traceback.
            raise self.CollectError(str(err)) from None
        for case in scenarios:
            item = ScenarioItem.from_parent(self, name=case.id, scenario=case)
            item.add_marker(pytest.mark.scenario)
            # Scenarios boot real guests: the project's `slow` marker lets `-m "not slow"` skip them.
            item.add_marker(pytest.mark.slow)
            # `-k kernel_debian` / `-k "not kernel_debian"` pick a kernel (ids only show debian).
            item.extra_keyword_matches.add(f"kernel_{case.kernel}")
            item.extra_keyword_matches.add(f"arch_{case.arch}")  # `-k arch_aarch64`
            for requirement in case.requires:
                item.add_marker(getattr(pytest.mark, f"requires_{requirement}"))
            for marker in case.data.get("markers") or []:
                item.add_marker(getattr(pytest.mark, marker))
            if "timeout" in case.data:
                # A scenario's own timeout bounds it; pytest-timeout (ini `timeout`) only ends
                # what hangs past that, so it gets a minute more than the scenario.
                item.add_marker(pytest.mark.timeout(case.timeout + 60))
            yield item


class ScenarioFailed(Exception):
    """A scenario case failed; carries the runner's :class:`~harness.scenario.ScenarioResult`."""

    def __init__(self, result: scn.ScenarioResult):
        super().__init__(result.message)
        self.result = result


class ScenarioItem(pytest.Item):
    """One scenario case, run by :class:`harness.scenario.ScenarioRunner`."""

    def __init__(self, *, scenario: scn.Scenario, **kwargs: Any):
        super().__init__(**kwargs)
        self.scenario = scenario
        self.result: scn.ScenarioResult | None = None

    def runtest(self) -> None:
        """Boot, run the steps, terminate; fail with the runner's report, skip on StepSkipped."""
        config = self.config
        artifacts = artifacts_dir_for(self)
        factory = EnclaveFactory(artifacts, qemu=config.getoption("--qemu"),
                                     accel=config.getoption("--accel"), cids=_cids(config))
        self.result = scn.ScenarioRunner(self.scenario, factory, artifacts_dir=artifacts,
                                         eif_dirs=[config.rootpath]).run()
        for step in self.result.steps:
            self.user_properties.append((f"step {step.number}",
                                         f"{step.status} {step.elapsed:.1f}s {step.label}"))
        if self.result.status == "skipped":
            pytest.skip(self.result.message)
        if self.result.status != "passed":
            raise ScenarioFailed(self.result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:  # type: ignore[override]
        """The runner's report (file:line of the step, why, console excerpt, artifacts path)."""
        if isinstance(excinfo.value, ScenarioFailed):
            return excinfo.value.result.failure_report()
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        """Location shown in reports: the scenario file and line (0-based for pytest)."""
        return self.path, self.scenario.line - 1, f"scenario {self.scenario.id}"
