"""The one settings model. Load it once in ``main()`` with :func:`load_settings`.

Sources, highest priority first: keyword arguments, environment (prefix ``PORTPULSE_``,
nested with ``__``, e.g. ``PORTPULSE_KAFKA__BOOTSTRAP_SERVERS``), an optional TOML file,
then the defaults below. Secrets are ``SecretStr`` and print as ``**********``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from portpulse.contract.errors import ConfigError

__all__ = [
    "AdmissionSettings",
    "InfluxSettings",
    "IngestSettings",
    "KafkaSettings",
    "MqttSettings",
    "OpsSettings",
    "ProcessorSettings",
    "RetentionSettings",
    "Settings",
    "SinkSettings",
    "SparkplugSettings",
    "load_settings",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _file_or_none(value: Any) -> Any:
    """A certificate, key or CA file: empty means none; one that is named must be a readable file
    (said at start-up, not discovered on the first connection)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


TlsFile = Annotated[Path | None, BeforeValidator(_file_or_none)]


class MqttSettings(_Section):
    """Connection to the MQTT broker the field gateways publish to."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    # "asyncio": PortPulse's own client (fast path); "paho": paho-mqtt (e.g. for MQTT over WebSockets).
    client: Literal["asyncio", "paho"] = "asyncio"
    client_id: str = "portpulse-bridge"
    topic_prefix: str = "sensors"
    subscriptions: tuple[str, ...] = ("sensors/#",)
    shared_group: str | None = None
    qos: int = Field(1, ge=0, le=2)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: TlsFile = None
    cert_file: TlsFile = None
    key_file: TlsFile = None
    keepalive_s: int = Field(30, ge=5)
    session_expiry_s: int = Field(3600, ge=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    # asyncio client: under a stream of small messages the kernel wakes it once this many bytes
    # wait (SO_RCVLOWAT), not every few packets; a message then waits at most about
    # 2 x read_wait_ms longer. 0: woken for every arrival.
    read_batch_bytes: int = Field(2048, ge=0, le=65536)
    read_wait_ms: float = Field(2.0, gt=0, le=100)

    @model_validator(mode="after")
    def _paho_cannot_hold_qos2(self) -> MqttSettings:
        if self.client == "paho" and self.qos == 2:
            # paho answers a QoS 2 PUBLISH with PUBREC on arrival, before Kafka has the message,
            # and keeps the exchange only in memory: a crash then loses a message the broker
            # considers delivered.
            raise ValueError(
                "mqtt.qos = 2 needs mqtt.client = 'asyncio': paho acknowledges QoS 2 messages "
                "(PUBREC) when they arrive, before Kafka has them, so a crash would lose them; "
                "use the asyncio client, or QoS 1 (a redelivered reading is a repeat the processor drops)"
            )
        return self


class KafkaSettings(_Section):
    """Kafka cluster, topics and producer tuning."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "portpulse"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    # Readings leave in batches PortPulse frames itself, lz4 in its fast mode: about 0.1 us per
    # record, 3x cheaper than zstd level 3 for 25 % more bytes, and cheaper for the broker and
    # consumers to decompress. (aiokafka's own path, used for dead letters, runs lz4 at level 9.)
    compression: Literal["lz4", "zstd", "gzip", "snappy", "none"] = "lz4"
    linger_ms: int = Field(5, ge=0)
    max_batch_bytes: int = Field(1_048_576, ge=16_384)
    request_timeout_ms: int = Field(30_000, ge=1000)
    # Like Kafka's delivery.timeout.ms: a batch unacknowledged this long is sent again by a new
    # producer (see BatchSender).
    delivery_timeout_ms: int = Field(120_000, ge=1000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_file: TlsFile = None
    consumer_group: str = "portpulse-processor"
    # Topics PortPulse creates: retention in seconds (-1: forever) and cleanup policy; the
    # registry topic is always compacted. Readings topics must keep at least the correction
    # horizon (ingest.max_past_s), or a correction could need readings Kafka no longer has: an
    # existing one that keeps less is a start-up error. The DLQ and the late topic keep longer,
    # for an operator to look at and replay.
    readings_retention_s: float = Field(8 * 86_400.0, ge=-1)
    dlq_retention_s: float = Field(30 * 86_400.0, ge=-1)
    late_retention_s: float = Field(30 * 86_400.0, ge=-1)
    cleanup_policy: Literal["delete", "compact,delete"] = "delete"


class InfluxSettings(_Section):
    """InfluxDB endpoint. For 1.8 the token is ``user:password`` and the bucket ``database/retention``.
    Over HTTPS, ``ca_file`` is the CA that signed the server's certificate (default: the system's)."""

    url: str = "http://127.0.0.1:8086"
    token: SecretStr = SecretStr("")
    org: str = "portpulse"
    bucket: str = "portpulse/raw"
    timeout_ms: int = Field(10_000, ge=100)
    verify_ssl: bool = True
    ca_file: TlsFile = None

    def ssl_option(self) -> ssl.SSLContext | bool:
        """aiohttp's ``ssl=``: the CA of ``ca_file``, the system's (True), or no verification (False)."""
        if not self.verify_ssl:
            return False
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class SinkSettings(_Section):
    """InfluxDB writer: batching, backpressure and retries."""

    batch_lines: int = Field(50_000, ge=1)
    # A request also closes at this many field values: lines of a multi-metric report hold several.
    batch_values: int = Field(50_000, ge=1)
    flush_interval_ms: int = Field(250, ge=1)
    max_pending_batches: int = Field(8, ge=1)
    concurrency: int = Field(2, ge=1, le=32)
    gzip: bool = False
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(10.0, gt=0)


class IngestSettings(_Section):
    """Bridge limits: what the bridge accepts and how much it holds while Kafka is away."""

    max_payload_bytes: int = Field(256 * 1024, ge=64)
    max_in_flight: int = Field(20_000, ge=1)
    max_future_s: float = Field(300.0, ge=0)
    max_past_s: float = Field(7 * 24 * 3600.0, ge=0)
    # Once Kafka has the last delivery, the next one waits until its first message is this old (or the
    # delivery is full): under load a delivery then holds more reports of each sensor, so fewer, fuller
    # records leave; light traffic waits at most this much more.
    linger_ms: float = Field(10.0, ge=0, le=1000)


class SparkplugSettings(_Section):
    """The bridge as an Eclipse Sparkplug B host application (``spBv1.0/#``, see docs/sparkplug.md)."""

    enabled: bool = False
    #: With a host id the bridge is a primary host: it publishes ``spBv1.0/STATE/{host_id}``
    #: (retained, online at connect, offline as its MQTT will), which edge nodes wait for.
    host_id: str | None = Field(None, pattern=r"^[^/#+]+$")
    #: Sparkplug metric names -> catalogue metrics, and ids -> site/sensor (None: the crane mapping shipped).
    mapping_file: Path | None = None
    #: A node is asked for a rebirth at most once per this many seconds.
    rebirth_interval_s: float = Field(30.0, gt=0)


class AdmissionSettings(_Section):
    """What the bridge lets into the pipeline: budgets of new series (a series is one sensor id of
    one site and domain, i.e. one InfluxDB series per table), an optional registry of the sensors
    each site may have, and a per-site rate ceiling. 0 turns a limit off. Over a limit, readings
    go to the DLQ (``cardinality_limit``, ``unknown_sensor``, ``rate_limit``) with their payload.

    The defaults fit a port: a site (a quay, a terminal, a district) holds tens to a few hundred
    sensors, so 1 000 new ones in an hour is a whole terminal commissioned at once, and more is
    a gateway minting ids. 200 000 series in all, times the raw table plus three window tables,
    stays under InfluxDB's own default guard of 1 000 000 series per database.
    """

    site_new_per_hour: int = Field(1_000, ge=0)
    site_new_per_day: int = Field(5_000, ge=0)
    domain_new_per_hour: int = Field(5_000, ge=0)
    domain_new_per_day: int = Field(20_000, ge=0)
    max_series: int = Field(200_000, ge=0)
    # A series unseen this long is forgotten (it counts as new if it returns); the default is the
    # correction horizon (ingest.max_past_s).
    quiet_after_s: float = Field(7 * 24 * 3600.0, gt=0)
    # "learn": every series the budgets admit is registered; "strict": only the series of the
    # registry file and of the registry topic at start-up pass (learn a fleet, then freeze it).
    registry: Literal["learn", "strict"] = "learn"
    registry_file: Path | None = None  # TOML ([site] domain = ["id", ...]) or CSV (domain,site,sensor_id)
    # Readings per second a site (the site of the MQTT topic) may send, 0: no ceiling. A token
    # bucket of site_burst_s seconds: a site of a few hundred sensors reporting 6-7 metrics a
    # second sends 2-4 000 readings/s, so 20 000 is a flood, and a minute's bucket takes a
    # gateway's store-and-forward backlog of several minutes. Messages over it are dead-lettered
    # undecoded (rate_limit): MQTT acks leave in receive order on one session, so holding one
    # site's messages back would hold every site's.
    site_rate_per_s: float = Field(20_000.0, ge=0)
    site_burst_s: float = Field(60.0, gt=0)


class RetentionSettings(_Section):
    """How long InfluxDB keeps each tier (seconds; -1: forever). Raw points (and rejected
    readings) go to ``influx.bucket``; with ``tiers``, each aggregate window goes to its own
    retention policy ``{database}/{window}`` (InfluxDB 1.x) or bucket ``{bucket}_{window}``
    (InfluxDB 2.x), created at start-up where missing and checked where present. The raw tier
    is ``influx.bucket`` itself.

    The defaults fit a port: raw readings serve investigations for a month, 1-minute aggregates
    serve a year of reporting, 15-minute aggregates are the long-term record.
    """

    tiers: bool = True
    raw_s: float = Field(30 * 86_400.0, ge=-1)
    windows_s: dict[str, float] = Field(
        default_factory=lambda: {"10s": 7 * 86_400.0, "1m": 365 * 86_400.0, "15m": -1.0}
    )
    other_windows_s: float = Field(-1.0, ge=-1)  # windows not in windows_s


class ProcessorSettings(_Section):
    """Cleaning: the metric catalogue (ranges, rates, units) and the spike filter's threshold."""

    catalogue: Path | None = None  # a TOML file like portpulse/catalogue.toml; None: the shipped one
    spike_k_sigma: float = Field(4.0, gt=0)  # Hampel: reject |x - median| > k * max(1.4826 MAD, floor)
    series_ttl_s: float = Field(6 * 3600.0, gt=0)  # a series quiet this long (no open window) is forgotten
    # A fetch from Kafka waits until it has this many bytes or fetch_wait_ms has passed: under load a step
    # takes many deliveries' records at once, and its fixed work (the commit among it) is paid per fetch.
    fetch_min_bytes: int = Field(256 * 1024, ge=1)
    fetch_wait_ms: int = Field(100, ge=0, le=5000)  # the most it adds to the latency when traffic is light
    # How often new domains' topics are looked for: each look reads the metadata of every topic in the
    # cluster (about 50 us of CPU per topic), and a new domain's readings wait for it at most this long.
    topic_discovery_s: float = Field(30.0, ge=1, le=3600)


class OpsSettings(_Section):
    """Logs and the metrics/health HTTP server."""

    log_format: Literal["human", "json"] = "human"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)
    # With a token, every endpoint but /livez and /readyz needs it: "Authorization: Bearer <token>",
    # or basic auth with the token as password (what a browser asks for the dashboard).
    auth_token: SecretStr | None = None
    tls_cert_file: TlsFile = None  # HTTPS for the ops endpoints (or put a TLS reverse proxy in front)
    tls_key_file: TlsFile = None

    @model_validator(mode="after")
    def _tls_needs_both(self) -> OpsSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("ops.tls_cert_file and ops.tls_key_file go together")
        return self


class Settings(BaseSettings):
    """Root configuration of every PortPulse process (frozen)."""

    model_config = SettingsConfigDict(
        env_prefix="PORTPULSE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    mqtt: MqttSettings = MqttSettings()
    kafka: KafkaSettings = KafkaSettings()
    influx: InfluxSettings = InfluxSettings()
    ingest: IngestSettings = IngestSettings()
    admission: AdmissionSettings = AdmissionSettings()
    sink: SinkSettings = SinkSettings()
    processor: ProcessorSettings = ProcessorSettings()
    retention: RetentionSettings = RetentionSettings()
    ops: OpsSettings = OpsSettings()
    sparkplug: SparkplugSettings = SparkplugSettings()

    @model_validator(mode="after")
    def _sparkplug_needs_every_message(self) -> Settings:
        if self.sparkplug.enabled and self.mqtt.shared_group:
            # A node's seq and aliases are followed message by message: a share of them cannot decode.
            raise ValueError(
                "sparkplug.enabled needs every message of an edge node in one bridge: "
                "unset mqtt.shared_group (run one Sparkplug bridge per broker)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls), file_secret_settings)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from the environment, an optional TOML file and keyword overrides.

    Raises :class:`ConfigError` with every invalid field listed, never a bare traceback.
    """
    from pydantic import ValidationError

    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        loaded = _FileSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    return Settings.model_construct(**{name: getattr(loaded, name) for name in Settings.model_fields})
