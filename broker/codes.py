"""PTP status codes: the values of OSX's own table (``StatusCode``), which SPU's yacl blackbox
link and FATE's OSX client read. Each comment gives the name yacl's table uses."""

from __future__ import annotations

OK = "E0000000000"  # OK
BAD_REQUEST = "E0000000400"  # BadRequest: a header or parameter is missing or malformed
UNAUTHORIZED = "E0000000403"  # ResourceForbidden: unknown source node or wrong token
NOT_FOUND = "E0000000404"  # ResourceNotFound (yacl waits and pops again on it, too)
TOO_LARGE = "E0000000413"  # message over the configured maximum size (OSX: BodyTooLarge)
INTERNAL = "E0000000500"  # SystemError: unexpected broker failure
HOP_LIMIT = "E0000000503"  # ServiceUnreachable (OSX: a request going round in circles)
POP_TIMEOUT = "E0000000601"  # RequestTimeout: a pop found nothing in time; pop again
PEER_UNREACHABLE = "E0000000607"  # NetworkError: the next-hop broker did not answer
ROUTE_NOT_FOUND = "E0000000618"  # NodeNotConnect: no route to the target party
QUEUE_FULL = "E0000000700"  # QueueFull: the client sleeps and pushes again

DESCRIPTIONS = {
    OK: "success",
    BAD_REQUEST: "bad request",
    UNAUTHORIZED: "not authorized",
    NOT_FOUND: "not found",
    TOO_LARGE: "message too large",
    INTERNAL: "internal broker error",
    HOP_LIMIT: "relay hop limit exceeded",
    POP_TIMEOUT: "no message within the pop timeout",
    PEER_UNREACHABLE: "peer broker unreachable",
    ROUTE_NOT_FOUND: "no route to the target party",
    QUEUE_FULL: "queue full",
}
