"""Hand-written codecs, pure (bytes in, numpy columns out, no sockets): the MQTT packet format
(``mqttwire``), Kafka record sets (``recordbatch``) and PortPulse's reading value format (``wire``)."""

__all__: list[str] = []
