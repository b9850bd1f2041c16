"""A party's Ray head: the ``ray start`` command psi-run recommends, and the preflight check.

Two Ray heads on one host must not share a port, so every port of a head is derived from the
port of its address ``B``: ``B`` (GCS) to ``B+8`` for the head's services and ``B+100`` to
``B+199`` for workers. The head carries a custom resource named after the party; SecretFlow
places the party's tasks with it, so a head without it would leave the job waiting for ever.

``python -m psi_runner.rayhead --party alice --address 127.0.0.1:31000`` prints the command
(``deploy/ray/start-ray-head.sh`` runs it).
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from pathlib import Path

from .errors import PreflightError

WORKER_PORTS = (100, 199)  # offsets from the head's port
SERVICE_PORTS = {  # offset from the head's port; 0 is --port itself (the GCS)
    "node-manager-port": 1,
    "object-manager-port": 2,
    "ray-client-server-port": 3,
    "dashboard-agent-grpc-port": 4,
    "dashboard-agent-listen-port": 5,
    "metrics-export-port": 6,
    "runtime-env-agent-port": 7,
    "dashboard-grpc-port": 8,
}


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def ray_start_command(
    party: str,
    address: str,
    num_cpus: int | None = None,
    temp_dir: str | None = None,
    block: bool = False,
    ray_bin: str | None = None,
    object_store_bytes: int | None = None,
) -> list[str]:
    """The ``ray start --head`` command for ``party``'s head at ``address`` (host:port)."""
    host, base = split_address(address)
    if base + WORKER_PORTS[1] > 65535:
        raise ValueError(
            f"port {base} leaves no room for the head's {WORKER_PORTS[1]} "
            "following ports; choose a port below 65336"
        )
    if ray_bin is None:
        candidate = Path(sys.executable).parent / "ray"
        ray_bin = str(candidate) if candidate.exists() else "ray"
    cmd = [ray_bin, "start", "--head", f"--node-ip-address={host}", f"--port={base}"]
    cmd += [f"--{name}={base + offset}" for name, offset in SERVICE_PORTS.items()]
    cmd += [
        "--include-dashboard=false",
        f"--min-worker-port={base + WORKER_PORTS[0]}",
        f"--max-worker-port={base + WORKER_PORTS[1]}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if object_store_bytes is not None:
        cmd.append(f"--object-store-memory={object_store_bytes}")
    # The party's resource: SecretFlow schedules the party's tasks on nodes that have it.
    cmd.append(f'--resources={{"{party}": 1000}}')
    cmd.append(f"--temp-dir={temp_dir or f'/tmp/ray-{party}'}")
    cmd.append("--disable-usage-stats")
    if block:
        cmd.append("--block")
    return cmd


def command_text(party: str, address: str) -> str:
    try:
        return shlex.join(ray_start_command(party, address))
    except ValueError as exc:
        return f"(no command: {exc})"


def check_head(party: str, address: str, connect_timeout_s: float = 3.0) -> dict[str, float]:
    """Preflight: the head answers, and its cluster has ``party``'s resource.

    Leaves this process connected to the cluster (SecretFlow's init reuses the connection).
    Returns the cluster's resources."""
    host, port = split_address(address)
    fix = f"start it on that host with: {command_text(party, address)}"
    try:
        with socket.create_connection((host, port), timeout=connect_timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PreflightError(
            f"the Ray head of {party} at {address} (parties.{party}.ray_address) does not "
            f"answer ({reason}); {fix}"
        ) from None
    version = _gcs_version(address, connect_timeout_s + 2)
    if version is None:
        raise PreflightError(
            f"{address} (parties.{party}.ray_address) answers, but not as a Ray head; point "
            f"ray_address at the head's --port, or {fix}"
        )
    import ray

    if version != ray.__version__:
        raise PreflightError(
            f"the Ray head of {party} at {address} runs Ray {version}, this psi-run has Ray "
            f"{ray.__version__}; start the head from this psi-run installation: "
            f"{command_text(party, address)}"
        )
    try:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=True, logging_level="warning")
        resources = dict(ray.cluster_resources())
    except Exception as exc:  # noqa: BLE001 - ray raises many kinds (version mismatch, ...)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        raise PreflightError(
            f"cannot join the Ray cluster of {party} at {address} ({first}); check that it "
            f"is a Ray head started from the same psi-run installation, or {fix}"
        ) from None
    if resources.get(party, 0) <= 0:
        raise PreflightError(
            f"the Ray cluster at {address} has no {party!r} resource, so {party}'s tasks "
            f"would wait for ever; restart its head with: {command_text(party, address)}"
        )
    return resources


def _gcs_version(address: str, timeout_s: float) -> str | None:
    """Ray's version as told by the GCS at ``address``, or None when it is not a Ray GCS.

    One gRPC call with a deadline: ``ray.init`` would retry for minutes against a port that
    is open but not Ray's."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        reply = stub.CheckAlive(gcs_service_pb2.CheckAliveRequest(), timeout=timeout_s)
        return reply.ray_version or None
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m psi_runner.rayhead",
        description="Print the ray start command for a party's Ray head (ports derived from "
        "--address so two heads on one host do not collide).",
    )
    parser.add_argument("--party", required=True)
    parser.add_argument("--address", required=True, help="host:port of the head (its GCS)")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--temp-dir", help="Ray's temp folder (default /tmp/ray-PARTY)")
    parser.add_argument(
        "--object-store-memory",
        type=int,
        metavar="BYTES",
        help="size of the head's object store (Ray's default: 30%% of RAM)",
    )
    parser.add_argument("--block", action="store_true", help="keep ray start in the foreground")
    args = parser.parse_args(argv)
    try:
        cmd = ray_start_command(
            args.party,
            args.address,
            args.num_cpus,
            args.temp_dir,
            args.block,
            object_store_bytes=args.object_store_memory,
        )
    except ValueError as exc:
        print(f"rayhead: {exc}", file=sys.stderr)
        return 2
    print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
