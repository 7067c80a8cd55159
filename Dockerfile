# PortPulse as an image (compose.yaml builds it for the pipeline and the simulators).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY portpulse ./portpulse
COPY ingest ./ingest
COPY processors ./processors
COPY sinks ./sinks
COPY simulators ./simulators
# gcc builds the seven C extensions (setup.py: name factoriser, line-protocol tokenizer, MQTT packet
# splitter, Kafka record codec and wire decoder, line-protocol encoder, Hampel checks, window
# aggregation) and is removed again; the image refuses to build without them.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
    && cd / && python -c "from portpulse.ingest.decode import LINE_TOKENIZER as t; from portpulse.codecs.mqttwire import PACKET_SPLITTER as s; from portpulse.codecs.recordbatch import RECORD_ENCODER as r; from portpulse.sinks.lineprotocol import LINE_ENCODER as e; from portpulse.processors.clean import HAMPEL_KERNEL as h; from portpulse.arrays import FACTORISER as f; from portpulse.codecs.wire import WIRE_DECODER as w; from portpulse.processors.window import AGGREGATE_KERNEL as a; assert t == s == r == e == h == f == w == a == 'compiled', (t, s, r, e, h, f, w, a)" \
    && useradd --system --uid 10001 portpulse
USER portpulse
ENTRYPOINT ["portpulse"]
CMD ["run"]
