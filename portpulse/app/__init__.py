"""The application shell: the ``portpulse`` command line, process wiring (``pipeline``,
``runtime``), the operations server and dashboard (``ops``) and ``portpulse top``. The only
place that imports every stage."""

__all__: list[str] = []
