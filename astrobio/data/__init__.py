"""Data: the built-in synthetic astrobiology corpus, the Open Exoplanet Catalogue reader, text and JSONL
files, tokenizers, and the packing loader. docs/DATA.md describes the formats.

Remote and authenticated sources live in ``astrobio.data.sources``; they hand local files to the
readers here.
"""

from astrobio.data.corpus import DERIVED_FIELDS, derive, field_completions, format_record, generate_system, parse_record
from astrobio.data.loader import PackedLoader, build_token_splits, load_records, split_records
from astrobio.data.oec import oec_records, read_oec
from astrobio.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "DERIVED_FIELDS",
    "ByteTokenizer",
    "PackedLoader",
    "build_token_splits",
    "derive",
    "field_completions",
    "format_record",
    "generate_system",
    "load_records",
    "load_tokenizer",
    "oec_records",
    "parse_record",
    "read_oec",
    "split_records",
]
