"""A stand-in for FATE 2.x's OSX federation client, run in a process of its own by
tests/test_fate_osx.py (as FATE's own runs beside its broker): the calls, their order and their
metadata keys and values are those of ``fate.arch.federation.backends.osx`` (its MQChannel),
sent with stubs generated from tests/fate_osx/osx.proto.

    python fate_client.py STUBS_DIR HOST:PORT < steps.json > results.json

A process of its own also keeps the generated ``org.ppc.ptp`` messages out of the test
process, where the broker's own definitions of the same names are loaded.

Steps (a JSON list), each answered by one result ``{"code", "message", "seconds", "payload"}``
(payload in hex; a pop answered OK also has the FATE ``properties`` and ``body`` it carried):

    {"op": "push", "session", "src", "dst", "topic", "properties": {...}, "body": hex}
    {"op": "pop", "session", "me", "topic", "timeout_ms"}
    {"op": "release", "session"}
    {"op": "raw", "method", "metadata": [[key, value], ...], "body": hex}
"""

from __future__ import annotations

import json
import random
import sys
import time

import grpc

_TRANSPORT = "/org.ppc.ptp.PrivateTransferTransport/"


def trace_id() -> str:
    """FATE's trace id: the time in seconds, "_", a random number below 10,000."""
    return f"{int(time.time())}_{random.randrange(10_000)}"


def push_metadata(session: str, src: str | None, dst: str | None) -> list[tuple[str, str]]:
    """What FATE's MQChannel.prepare_metadata sends with a push (and with a release)."""
    md = [("x-ptp-trace-id", trace_id()), ("x-ptp-session-id", session)]
    if dst is not None:
        md.append(("x-ptp-target-node-id", dst))
    if src is not None:
        md.append(("x-ptp-from-node-id", src))
    md.append(("x-ptp-tech-provider-code", "FATE"))
    return md


def pop_metadata(session: str, me: str) -> list[tuple[str, str]]:
    """What FATE's MQChannel.prepare_metadata_consume sends with a pop: its own party as the
    "from" node, no target and no topic header (the topic is the message's field)."""
    return [
        ("x-ptp-session-id", session),
        ("x-ptp-from-node-id", me),
        ("x-ptp-tech-provider-code", "FATE"),
        ("x-ptp-trace-id", trace_id()),
    ]


def run(steps: list[dict], stub, channel, osx_pb2) -> list[dict]:
    results = []
    for step in steps:
        started = time.monotonic()
        op = step["op"]
        if op == "push":
            message = osx_pb2.Message(
                head=json.dumps(step["properties"]).encode("utf-8"),
                body=bytes.fromhex(step["body"]),
            )
            out = stub.push(
                osx_pb2.PushInbound(topic=step["topic"], payload=message.SerializeToString()),
                metadata=push_metadata(step["session"], step.get("src"), step.get("dst")),
            )
        elif op == "pop":
            out = stub.pop(
                osx_pb2.PopInbound(topic=step["topic"], timeout=step["timeout_ms"]),
                metadata=pop_metadata(step["session"], step["me"]),
            )
        elif op == "release":  # FATE's _destroy: a channel with no parties and no topics
            out = stub.release(
                osx_pb2.ReleaseInbound(), metadata=push_metadata(step["session"], None, None)
            )
        else:
            call = channel.unary_unary(_TRANSPORT + step["method"])
            raw = call(bytes.fromhex(step["body"]), metadata=[tuple(m) for m in step["metadata"]])
            out = osx_pb2.TransportOutbound.FromString(raw)
        result = {
            "code": out.code,
            "message": out.message,
            "seconds": time.monotonic() - started,
            "payload": out.payload.hex(),
        }
        if op == "pop" and out.code == "E0000000000":
            message = osx_pb2.Message.FromString(out.payload)
            result["properties"] = json.loads(message.head.decode("utf-8"))
            result["body"] = message.body.hex()
        results.append(result)
    return results


def main() -> None:
    stubs, target = sys.argv[1], sys.argv[2]
    sys.path.insert(0, stubs)
    import osx_pb2
    import osx_pb2_grpc

    options = [  # as FATE's MQChannel opens its channel
        ("grpc.max_send_message_length", (2 << 30) - 1),
        ("grpc.max_receive_message_length", (2 << 30) - 1),
        ("grpc.max_metadata_size", 128 << 20),
        ("grpc.keepalive_time_ms", 7200 * 1000),
        ("grpc.keepalive_timeout_ms", 3600 * 1000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = osx_pb2_grpc.PrivateTransferTransportStub(channel)
        results = run(json.load(sys.stdin), stub, channel, osx_pb2)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
