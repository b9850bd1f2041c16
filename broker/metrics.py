"""Prometheus text exposition of a broker's counters."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dispatch import Dispatcher


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(d: Dispatcher) -> str:
    lines = [
        "# HELP psi_broker_queue_depth Messages waiting in all queues.",
        "# TYPE psi_broker_queue_depth gauge",
        f"psi_broker_queue_depth {d.queues.depth()}",
        "# HELP psi_broker_queues Queues that exist.",
        "# TYPE psi_broker_queues gauge",
        f"psi_broker_queues {len(d.queues)}",
        "# HELP psi_broker_queue_bytes Payload bytes held in queues.",
        "# TYPE psi_broker_queue_bytes gauge",
        f"psi_broker_queue_bytes {d.queues.total_bytes}",
        "# HELP psi_broker_outbox_depth Messages accepted for other brokers, not yet sent on.",
        "# TYPE psi_broker_outbox_depth gauge",
        f"psi_broker_outbox_depth {d.outbox.depth()}",
    ]
    if d.store is not None:
        lines += [
            "# HELP psi_broker_store_messages Messages in the durable store, not yet confirmed.",
            "# TYPE psi_broker_store_messages gauge",
            f"psi_broker_store_messages {len(d.store)}",
            "# HELP psi_broker_store_bytes Bytes of the durable store's segments in use.",
            "# TYPE psi_broker_store_bytes gauge",
            f"psi_broker_store_bytes {d.store.bytes_on_disk}",
        ]
    families: dict[str, list[str]] = {}
    for key, value in sorted(d.counters.items()):
        name, _, label = key.partition("|")
        if name == "errors":
            families.setdefault(name, []).append(
                f'psi_broker_errors_total{{code="{_label(label)}"}} {value}'
            )
        else:
            families.setdefault(name, []).append(
                f'psi_broker_{name}_total{{peer="{_label(label)}"}} {value}'
            )
    for name, rows in families.items():
        lines.append(f"# TYPE psi_broker_{name}_total counter")
        lines.extend(rows)
    return "\n".join(lines) + "\n"
