"""The contract every stage shares and nothing else defines: settings, the reading schema, the metric
catalogue, topic names, errors, points and the point store a processor writes to, dead letters and
health. It imports nothing of PortPulse outside itself."""

__all__: list[str] = []
