"""The one thing pyproject.toml cannot declare stably: the compiled line-protocol tokenizer.

Optional: where no C compiler is at hand the install still succeeds and ingest/decode.py uses its
Python tokenizer (the bridge logs which one it runs).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("portpulse.ingest._lineproto", ["ingest/_lineproto.c"], optional=True)])
