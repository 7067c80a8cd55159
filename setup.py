"""The one thing pyproject.toml cannot declare stably: the compiled halves of three hot loops, the
line-protocol tokenizer, the MQTT packet splitter and the Kafka record encoder.

Optional: where no C compiler is at hand the install still succeeds and the Python halves run
(the bridge logs which ones it runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("portpulse.ingest._lineproto", ["ingest/_lineproto.c"], optional=True),
        Extension("portpulse.codecs._mqttsplit", ["portpulse/codecs/_mqttsplit.c"], optional=True),
        Extension("portpulse.codecs._records", ["portpulse/codecs/_records.c"], optional=True),
    ]
)
