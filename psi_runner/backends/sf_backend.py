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

from ..errors import BackendError, PeerError, PreflightError
from ..link import LinkSettings, blackbox_desc
from ..spec import JobSpec
from .calls import CallFailed, PsiCall, execute
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.secretflow")

FED_SUFFIX = "-fed"  # SecretFlow's own link runs on session "<session>-fed"


def placeholder_address(party: str) -> str:
    """A cluster_config address that is never dialled (the fed link is a blackbox link)."""
    return f"{party}.via-psi-broker:1"


def _broker_link_proxy(base: type, parties: list[str], env: dict[str, str],
                       settings: LinkSettings) -> type:
    """A subclass of a fed brpc-link proxy class whose link goes through the broker.

    Built at run time so that Ray pickles it by value (with ``env``) into the proxy actor."""

    def __init__(self, *args, **kwargs):  # noqa: N807
        base.__init__(self, *args, **kwargs)
        self._desc = blackbox_desc(settings, parties, env["config.session_id"])

    def start(self):
        os.environ.update(env)  # the blackbox link reads these when it is created
        return base.start(self)

    return type(f"Brokered{base.__name__}", (base,),
                {"__init__": __init__, "start": start, "psi_run_original": base})


def party_task(spec: JobSpec, party: str, call: PsiCall | None, env: dict[str, str] | None,
               session: str) -> dict:
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


def run(spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str,
        stages: dict[str, float], **_: object) -> int:
    """Run the PSI through SecretFlow; return this party's intersection count (-1: none)."""
    t0 = time.monotonic()
    try:
        import secretflow as sf
    except Exception as exc:  # noqa: BLE001 - a broken install shows up as any exception
        log.exception("import secretflow failed")
        raise BackendError(
            f"job {spec.job_id}: backend {spec.backend} needs SecretFlow, which cannot be "
            f"imported ({type(exc).__name__}: {str(exc)[:150]}); run scripts/setup.sh again, "
            "or use backend: embedded") from exc

    stages["import_s"] = time.monotonic() - t0
    ray_mode = spec.backend == "ray"
    parties = spec.party_names
    fed_env = {**env, "config.session_id": session + FED_SUFFIX}
    if ray_mode:
        import fed.proxy.brpc_link.link as proxy_module  # RayFed (Ray mode)

        proxy_name = "BrpcLinkSenderReceiverProxy"
    else:
        import secretflow.distributed.fed.api as proxy_module  # SecretFlow's own fed

        proxy_name = "BrpcLinkProxy"
    original = getattr(proxy_module, proxy_name)
    original = getattr(original, "psi_run_original", original)
    setattr(proxy_module, proxy_name,
            _broker_link_proxy(original, parties, fed_env, spec.link))

    cluster_config = {
        "parties": {p: {"address": placeholder_address(p),
                        "listen_addr": placeholder_address(p)} for p in parties},
        "self_party": party,
    }
    init_args: dict = {
        "cluster_config": cluster_config,
        "cross_silo_comm_backend": "brpc_link",
        "job_name": session,
        "logging_level": "info",
        "enable_waiting_for_other_parties_ready": True,
    }
    if ray_mode:
        init_args.update(address=spec.parties[party].ray_address, ray_mode=True,
                         log_to_driver=True, ignore_reinit_error=True)
    else:
        init_args.update(ray_mode=False)

    failed = True
    t1 = time.monotonic()
    try:
        # SecretFlow's fed layer installs a SIGINT handler that lets the job run on; it never
        # fires, since psi-run's job process takes SIGINT in its own thread (interrupts.py).
        try:
            sf.init(**init_args)
        except Exception as exc:  # noqa: BLE001
            log.error("sf.init failed: %s", exc, exc_info=True)
            raise translate_spu_error(exc, spec, party, "starting SecretFlow") from exc
        stages["sf_init_s"] = time.monotonic() - t1

        t2 = time.monotonic()
        # The identical sequence on both sides: one task per party in spec order; each
        # party executes only its own (its arguments never leave this process).
        objs = [
            sf.PYU(p)(party_task)(spec, p, call if p == party else None,
                                  env if p == party else None, session)
            for p in parties
        ]
        mine = _own_result(objs[parties.index(party)], ray_mode)
        stages["psi_task_s"] = time.monotonic() - t2
        if "error" in mine:
            log.error("%s failed: %s", mine["stage"], mine["error"])
            # job.py tells the peer (its watchdog) so it stops now rather than at a timeout
            raise translate_spu_error(RuntimeError(mine["error"]), spec, party, mine["stage"])
        stages["link_s"] = mine["link_s"]
        stages["psi_s"] = mine["psi_s"]

        t3 = time.monotonic()
        reports = sf.reveal(objs)  # cross-silo: each side learns the other's report
        stages["reveal_s"] = time.monotonic() - t3
        peer_report = reports[1 - parties.index(party)]
        if "error" in peer_report:
            raise PeerError(f"job {spec.job_id}: {spec.peer_of(party)} failed "
                            f"{peer_report['stage']}: {peer_report['error'][:200]}")
        log.info("job %s party %s: reports %s", spec.job_id, party, reports)
        failed = False
        return int(mine["intersection_count"])
    except (BackendError, PeerError, PreflightError):
        raise
    except Exception as exc:  # noqa: BLE001 - SecretFlow/RayFed errors of any kind
        log.error("SecretFlow failed: %s", exc, exc_info=True)
        raise translate_spu_error(exc, spec, party, "running the job in SecretFlow") from exc
    finally:
        t4 = time.monotonic()
        # SecretFlow's fed layer ends the process (os._exit(1)) when shut down after an error
        # unless this is set; psi-run must live on to clean up and say what went wrong.
        os.environ["SF_UT_DO_NOT_EXIT_ENV_FLAG"] = "1"
        try:
            sf.shutdown(barrier_on_shutdown=False, on_error=failed)
        except Exception:  # noqa: BLE001
            log.warning("sf.shutdown failed", exc_info=True)
        stages["shutdown_s"] = time.monotonic() - t4
