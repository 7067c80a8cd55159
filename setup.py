"""The one thing pyproject.toml cannot declare stably: the compiled halves of seven hot loops, the
name factoriser and line pairing, the line-protocol tokenizer, the MQTT packet splitter, the Kafka
record codec (encoding, parsing, key hashing and interning, and the wire values' decoding), the
line-protocol encoder, the cleaning kernel's Hampel checks and the aggregation of closing windows.

Optional: where no C compiler is at hand the install still succeeds and the Python halves run
(the bridge logs which ones it runs).
"""

from setuptools import Extension, setup

COLUMN_H = "portpulse/_column.h"  # the column helper four extensions include
SORT_H = "portpulse/_sort.h"  # the small sort two extensions include
HASH_H = "portpulse/_hash.h"  # the byte-string hash two extensions include

setup(
    ext_modules=[
        Extension("portpulse._arrays", ["portpulse/_arrays.c"], depends=[COLUMN_H], optional=True),
        Extension("portpulse.ingest._lineproto", ["ingest/_lineproto.c"], depends=[HASH_H], optional=True),
        Extension("portpulse.codecs._mqttsplit", ["portpulse/codecs/_mqttsplit.c"], optional=True),
        Extension("portpulse.codecs._records", ["portpulse/codecs/_records.c"], depends=[HASH_H], optional=True),
        Extension("portpulse.sinks._lineformat", ["sinks/_lineformat.c"], depends=[COLUMN_H], optional=True),
        Extension(
            "portpulse.processors._hampel",
            ["processors/_hampel.c"],
            depends=[COLUMN_H, SORT_H],
            # -ffp-contract=off: numpy's arithmetic exactly (no fused multiply-add);
            # -fno-tree-loop-distribute-patterns: copies of a few slots stay loops, not memcpy calls.
            extra_compile_args=["-ffp-contract=off", "-fno-tree-loop-distribute-patterns"],
            optional=True,
        ),
        Extension(
            "portpulse.processors._windows",
            ["processors/_windows.c"],
            depends=[COLUMN_H, SORT_H],
            extra_compile_args=["-ffp-contract=off"],  # numpy's arithmetic exactly: no fused multiply-add
            optional=True,
        ),
    ]
)
