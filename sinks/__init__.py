"""Sinks: InfluxDB line-protocol encoding (pure), the batching/retrying writer, analyst queries."""

from portpulse.sinks.lineprotocol import Categorical, EncodedLines, PointColumns, encode_lines
from portpulse.sinks.writer import InfluxTransport, InfluxWriter, LineTransport, WriteResult, WriteTicket

__all__ = [
    "Categorical",
    "EncodedLines",
    "InfluxTransport",
    "InfluxWriter",
    "LineTransport",
    "PointColumns",
    "WriteResult",
    "WriteTicket",
    "encode_lines",
]
