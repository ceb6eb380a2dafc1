"""All data handling, in one place: sources -> held-out split -> tokenisation -> packing.

    sources.py    `--data LANG=SPEC` (txt, jsonl/json, parquet, directories, hf:, builtin),
                  read as a stream of chunks; `load_documents` / `load_texts` for profile and eval
    split.py      the hash-based held-out split (5%) and its at-least-one-each fix-up
    languages.py  ISO 639 codes and scripts of `--old`/`--new`
    tokenize.py   parse + split + tokenise chunks on every core (ordered, bounded)
    selection.py  `DataSelection`: which documents a stage reads (budgets, replay), torch-free
    prepare.py    a training stage's data: budgets, seeded shuffle buffer, cache key, atomic
                  publication, resume after a kill (`layermoe prepare`)
    packing.py    the prepared data memory-mapped as fixed-length blocks with per-token labels

Training, `profile` and `eval` all read through this package.
"""

from layermoe.data.packing import IGNORE, PackedData, PreparedData, block_indices, open_prepared
from layermoe.data.prepare import (
    is_prepared,
    prepare,
    prepare_or_wait,
    prepared_key,
    stage_languages,
    wait_for_prepared,
)
from layermoe.data.selection import SELECTION_FIELDS, DataSelection
from layermoe.data.sources import (
    STREAMING_THRESHOLD_BYTES,
    Source,
    builtin_corpus_path,
    builtin_languages,
    describe_source,
    load_documents,
    load_texts,
    parse_data_args,
    source_kind,
)
from layermoe.data.split import HELDOUT_FRACTION, is_heldout
from layermoe.data.tokenize import id_dtype, tokenizer_fingerprint, usable_cores

__all__ = [
    "HELDOUT_FRACTION",
    "IGNORE",
    "PackedData",
    "PreparedData",
    "SELECTION_FIELDS",
    "DataSelection",
    "STREAMING_THRESHOLD_BYTES",
    "Source",
    "block_indices",
    "builtin_corpus_path",
    "builtin_languages",
    "describe_source",
    "id_dtype",
    "is_heldout",
    "is_prepared",
    "load_documents",
    "load_texts",
    "open_prepared",
    "parse_data_args",
    "prepare",
    "prepare_or_wait",
    "prepared_key",
    "source_kind",
    "stage_languages",
    "tokenizer_fingerprint",
    "usable_cores",
    "wait_for_prepared",
]
