"""The ``secretflow`` and ``ray`` backends: the same PSI call, run by SecretFlow in production mode.

* ``secretflow``: ``sf.init(cluster_config=..., ray_mode=False)``; PYU tasks run as threads of
  the runner's process.
* ``ray``: ``sf.init(address=<party's ray_address>, cluster_config=...)``; PYU tasks run in the
  party's own Ray cluster (which may span many machines).

Both parties make the identical call sequence, derived from the spec alone:

1. ``sf.init`` with the agreed session as job name;
2. one PYU task per party, in the spec's party order, each running ``calls.execute`` (the
   SPU link through the brokers, then the spec's ``psi``/``psi_csv`` call) on its own party;
3. ``sf.reveal`` of both task reports;
4. ``sf.shutdown`` (on every path).

**Every byte between the parties goes through the brokers.** The SPU link is built by
``calls.execute`` with yacl's blackbox link type (``sf.SPU`` cannot be told to). SecretFlow's own
cross-silo messages (the ``fed`` layer) use ``cross_silo_comm_backend='brpc_link'``, whose link
class is swapped here for one that is a blackbox link too, on its own session
(``<session>-fed``). SecretFlow therefore listens on no TCP port and the ``cluster_config``
addresses are placeholders that are never dialled.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from ..errors import BackendError, PeerError, PsiRunError
from ..link import LinkSettings, blackbox_desc
from ..spec import JobSpec
from . import BackendResult
from .calls import CallFailed, PsiCall, execute
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.secretflow")

FED_SUFFIX = "-fed"  # SecretFlow's own link runs on session "<session>-fed"


def extra_sessions(session: str) -> list[str]:
    """SecretFlow's own (fed) link session, besides the SPU link's."""
    return [session + FED_SUFFIX]


def placeholder_address(party: str) -> str:
    """A cluster_config address that is never dialled (the fed link is a blackbox link)."""
    return f"{party}.via-psi-broker:1"


def _broker_link_proxy(
    base: type, parties: list[str], env: dict[str, str], settings: LinkSettings
) -> type:
    """A subclass of a fed brpc-link proxy class whose link goes through the broker.

    Built at run time so that Ray pickles it by value (with ``env``) into the proxy actor."""

    def __init__(self, *args, **kwargs):  # noqa: N807
        base.__init__(self, *args, **kwargs)
        self._desc = blackbox_desc(settings, parties, env["config.session_id"])

    def start(self):
        os.environ.update(env)  # the blackbox link reads these when it is created
        return base.start(self)

    return type(f"Brokered{base.__name__}", (base,), {"__init__": __init__, "start": start})


@contextmanager
def _fed_link_through_broker(
    ray_mode: bool, parties: list[str], env: dict[str, str], settings: LinkSettings
) -> Iterator[None]:
    """Swap the fed layer's brpc-link proxy class for a brokered one while the job runs.

    Neither ``sf.init`` nor SecretFlow's own fed layer take a proxy class, so this is the one
    place psi-run changes a SecretFlow/RayFed attribute; the original is put back after."""
    if ray_mode:
        import fed.proxy.brpc_link.link as module  # RayFed (Ray mode)

        name = "BrpcLinkSenderReceiverProxy"
    else:
        import secretflow.distributed.fed.api as module  # SecretFlow's own fed

        name = "BrpcLinkProxy"
    original = getattr(module, name)
    setattr(module, name, _broker_link_proxy(original, parties, env, settings))
    try:
        yield
    finally:
        setattr(module, name, original)


def party_task(
    spec: JobSpec, party: str, call: PsiCall | None, env: dict[str, str] | None, session: str
) -> dict:
    """The PYU task: this party's side of the PSI. Returns a report or ``{"error", "stage"}``
    (an exception would end the peer's job with SecretFlow's own unreadable trace)."""
    try:
        return execute(spec, party, call, env, session)  # type: ignore[arg-type]
    except CallFailed as exc:
        return {"error": str(exc), "stage": exc.stage}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}", "stage": "running the PSI"}


def _own_result(obj: object, ray_mode: bool) -> dict:
    """Wait for this party's own task without any cross-silo message."""
    fed_object = obj.data  # type: ignore[attr-defined]
    if ray_mode:
        import ray

        return ray.get(fed_object.get_ray_object_ref())
    return fed_object.get_object()


def _import_secretflow(spec: JobSpec) -> ModuleType:
    try:
        import secretflow as sf
    except Exception as exc:
        log.exception("import secretflow failed")
        raise BackendError(
            f"job {spec.job_id}: backend {spec.backend} needs SecretFlow, which cannot be "
            f"imported ({type(exc).__name__}: {str(exc)[:150]}); run scripts/setup.sh again, "
            "or use backend: embedded"
        ) from exc
    return sf


def _init_args(spec: JobSpec, party: str, session: str) -> dict:
    cluster_config = {
        "parties": {
            p: {"address": placeholder_address(p), "listen_addr": placeholder_address(p)}
            for p in spec.party_names
        },
        "self_party": party,
    }
    args: dict = {
        "cluster_config": cluster_config,
        "cross_silo_comm_backend": "brpc_link",
        "job_name": session,
        "logging_level": "info",
        "enable_waiting_for_other_parties_ready": True,
    }
    if spec.backend == "ray":
        args.update(
            address=spec.parties[party].ray_address,
            ray_mode=True,
            log_to_driver=True,
            ignore_reinit_error=True,
        )
    else:
        args.update(ray_mode=False)
    return args


class _Steps:
    """Times the steps of a SecretFlow run and remembers which one is running (for errors)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current = "starting SecretFlow"

    @contextmanager
    def step(self, key: str, during: str | None = None) -> Iterator[None]:
        if during:
            self.current = during
        t = time.monotonic()
        yield
        self.seconds[key] = time.monotonic() - t


def run(
    spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str
) -> BackendResult:
    """Run the PSI through SecretFlow; this party's intersection count (-1: none).

    The one boundary where SecretFlow's, RayFed's and SPU's errors become psi-run's."""
    steps = _Steps()
    with steps.step("import_s"):
        sf = _import_secretflow(spec)
    fed_env = {**env, "config.session_id": session + FED_SUFFIX}
    failed = True
    try:
        with _fed_link_through_broker(spec.backend == "ray", spec.party_names, fed_env, spec.link):
            # SecretFlow's fed layer installs a SIGINT handler that lets the job run on; it
            # never fires: psi-run's job process takes SIGINT in its own thread (interrupts).
            with steps.step("sf_init_s"):
                sf.init(**_init_args(spec, party, session))
            count = _run_tasks(sf, spec, party, call, env, session, steps)
        failed = False
        return BackendResult(count, steps.seconds)
    except PsiRunError:
        raise
    except CallFailed as exc:
        log.error("%s failed: %s", exc.stage, exc)
        raise translate_spu_error(exc, spec, party, exc.stage) from exc
    except Exception as exc:
        log.exception("%s failed: %s", steps.current, exc)
        raise translate_spu_error(exc, spec, party, steps.current) from exc
    finally:
        with steps.step("shutdown_s"):
            _shutdown(sf, failed)


def _run_tasks(
    sf: ModuleType,
    spec: JobSpec,
    party: str,
    call: PsiCall,
    env: dict[str, str],
    session: str,
    steps: _Steps,
) -> int:
    parties = spec.party_names
    with steps.step("psi_task_s", during="running the job in SecretFlow"):
        # The identical sequence on both sides: one task per party in spec order; each
        # party executes only its own (its arguments never leave this process).
        objs = [
            sf.PYU(p)(party_task)(
                spec, p, call if p == party else None, env if p == party else None, session
            )
            for p in parties
        ]
        mine = _own_result(objs[parties.index(party)], spec.backend == "ray")
    if "error" in mine:
        raise CallFailed(mine["stage"], mine["error"])
    steps.seconds["link_s"] = mine["link_s"]
    steps.seconds["psi_s"] = mine["psi_s"]
    with steps.step("reveal_s"):
        reports = sf.reveal(objs)  # cross-silo: each side learns the other's report
    peer_report = reports[1 - parties.index(party)]
    if "error" in peer_report:
        raise PeerError(
            f"job {spec.job_id}: {spec.peer_of(party)} failed "
            f"{peer_report['stage']}: {peer_report['error'][:200]}"
        )
    log.info("job %s party %s: reports %s", spec.job_id, party, reports)
    return int(mine["intersection_count"])


def _shutdown(sf: ModuleType, failed: bool) -> None:
    # SecretFlow's fed layer ends the process (os._exit(1)) when shut down after an error
    # unless this is set; psi-run must live on to clean up and say what went wrong.
    os.environ["SF_UT_DO_NOT_EXIT_ENV_FLAG"] = "1"
    try:
        sf.shutdown(barrier_on_shutdown=False, on_error=failed)
    except Exception:
        log.warning("sf.shutdown failed", exc_info=True)
