"""An edge node built on pysparkplug (an implementation PortPulse did not write), for
tests/integration/test_sparkplug.py. Runs in the peer venv (``.venv/sparkplug-peer``: pysparkplug
pins paho-mqtt < 2).

``python sparkplug_peer.py HOST PORT GROUP EDGE_NODE DEVICE REPORTS``: connects (NBIRTH, DBIRTH
with names and datatypes), publishes REPORTS DDATA, prints one JSON line per value it sent
(births included), then ``sent`` and waits: a line ``disconnect`` on stdin disconnects cleanly
(NDEATH), anything else or SIGKILL leaves the broker to publish its will.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pysparkplug import Client, DataType, Device, EdgeNode, Metric

#: name -> (datatype, values of each report): exact in float32, and within the catalogue's rates of
#: change one report (1 s) apart, so cleaning keeps every one
METRICS: dict[str, tuple[Any, list[Any]]] = {
    "Hoist/Load": (DataType.FLOAT, [12500.0, 30250.5, 0.0, 41000.25]),
    "Trolley/Position": (DataType.DOUBLE, [-12.125, -9.5, -7.0625, -5.0]),
    "Hoist/Motor Temperature": (DataType.INT16, [-5, -4, -3, -2]),
    "Spreader/Locked": (DataType.BOOLEAN, [True, False, True, True]),
    "Counters/Moves": (DataType.UINT64, [120034, 120035, 120036, 120037]),
    "Environment/Wind Speed": (DataType.STRING, ["12.5", "30", "45.25", "7"]),
}


def main() -> None:
    host, port, group, edge_node, device_id, reports = sys.argv[1:7]
    start_ms = int(time.time() * 1000) - 60_000

    def report(k: int) -> list[Metric]:
        ts = start_ms + 1000 * k
        return [Metric(timestamp=ts, name=n, datatype=t, value=v[k % len(v)]) for n, (t, v) in METRICS.items()]

    def say(kind: str, k: int) -> None:
        for n, (t, v) in METRICS.items():
            print(
                json.dumps(
                    {"kind": kind, "name": n, "datatype": int(t), "ts": start_ms + 1000 * k, "value": v[k % len(v)]}
                ),
                flush=True,
            )

    node = EdgeNode(group, edge_node, metrics=[], client=Client(client_id=f"{group}-{edge_node}"))
    node.register(Device(device_id, report(0)))
    node.connect(host, port=int(port), blocking=False)
    say("DBIRTH", 0)
    time.sleep(0.5)  # let the births leave before the data (the client publishes from its own thread)
    for k in range(1, int(reports) + 1):
        node.update_device(device_id, report(k))
        say("DDATA", k)
    print("sent", flush=True)
    if sys.stdin.readline().strip() == "disconnect":
        node.disconnect()
        time.sleep(0.5)
        print("disconnected", flush=True)
    else:
        time.sleep(3600)


if __name__ == "__main__":
    main()
