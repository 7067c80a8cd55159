"""Processors: the pure numpy kernels (``clean``, ``window``), the per-series state that drives them
(``engine``) and the Kafka consumer loop around it (``loop``)."""

__all__: list[str] = []
