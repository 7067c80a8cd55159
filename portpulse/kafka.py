"""Kafka client options and producer start-up shared by every stage (one place for security)."""

from __future__ import annotations

import ssl
from typing import Any

from portpulse.errors import ServiceUnavailableError
from portpulse.settings import KafkaSettings

__all__ = ["client_options", "start_producer"]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the bootstrap servers and SASL/TLS settings."""
    out: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "security_protocol": kafka.security_protocol}
    if kafka.sasl_mechanism:
        out["sasl_mechanism"] = kafka.sasl_mechanism
        out["sasl_plain_username"] = kafka.sasl_username
        out["sasl_plain_password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = ssl.create_default_context(cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None)
    return out


async def start_producer(kafka: KafkaSettings, what: str, **options: Any) -> Any:
    """An idempotent ``acks=all`` producer, started; raises :class:`ServiceUnavailableError` if Kafka
    does not answer (the message names the servers, never credentials)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **client_options(kafka),
        acks="all",
        enable_idempotence=True,
        compression_type=None if kafka.compression == "none" else kafka.compression,
        request_timeout_ms=kafka.request_timeout_ms,
        **options,
    )
    try:
        await producer.start()
    except Exception as exc:
        await producer.stop()
        raise ServiceUnavailableError("kafka", f"{what} at {kafka.bootstrap_servers}: {type(exc).__name__}") from None
    return producer
