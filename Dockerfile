# PortPulse as an image (compose.yaml builds it for the pipeline and the simulators).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY portpulse ./portpulse
COPY ingest ./ingest
COPY processors ./processors
COPY sinks ./sinks
COPY simulators ./simulators
RUN pip install --no-cache-dir . && useradd --system --uid 10001 portpulse
USER portpulse
ENTRYPOINT ["portpulse"]
CMD ["run"]
