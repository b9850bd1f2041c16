"""PTP status codes, as SPU's blackbox link and OSX clients understand them."""

from __future__ import annotations

OK = "E0000000000"
BAD_REQUEST = "E0000000400"  # a header or parameter is missing or malformed
UNAUTHORIZED = "E0000000401"  # unknown source node or wrong token
NOT_FOUND = "E0000000404"  # nothing in the queue yet: the client waits and polls again
TOO_LARGE = "E0000000413"  # message over the configured maximum size
INTERNAL = "E0000000500"  # unexpected broker failure
ROUTE_NOT_FOUND = "E0000000601"  # no route to the target party
PEER_UNREACHABLE = "E0000000602"  # the next-hop broker did not answer
HOP_LIMIT = "E0000000603"  # a message went round too many relays
QUEUE_FULL = "E0000000700"  # the client sleeps and pushes again

DESCRIPTIONS = {
    OK: "success",
    BAD_REQUEST: "bad request",
    UNAUTHORIZED: "unauthorized",
    NOT_FOUND: "no message yet",
    TOO_LARGE: "message too large",
    INTERNAL: "internal broker error",
    ROUTE_NOT_FOUND: "no route to the target party",
    PEER_UNREACHABLE: "peer broker unreachable",
    HOP_LIMIT: "relay hop limit exceeded",
    QUEUE_FULL: "queue full",
}
