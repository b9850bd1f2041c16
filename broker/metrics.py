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
