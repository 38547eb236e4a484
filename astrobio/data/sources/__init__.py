"""Data sources behind one interface: ``open_source(uri) -> Source`` with ``fetch()``, ``records()`` and
``rows()``, for local files, the built-in corpus and HTTP(S) downloads (authenticated, cached, resumed,
retried). docs/DATA_SOURCES.md describes the URIs, the credentials and the cache."""

from astrobio.data.sources.auth import AuthError, AuthSpec, env_var_for_host, redact_uri
from astrobio.data.sources.cache import cache_dir
from astrobio.data.sources.http import HTTPSource, RetryPolicy
from astrobio.data.sources.oec_split import SplitCatalogueSource
from astrobio.data.sources.registry import (FORMATS, BuiltinSource, FileSource, Source, SourceError, open_source,
                                            register_scheme, schemes)

__all__ = ["FORMATS", "AuthError", "AuthSpec", "BuiltinSource", "FileSource", "HTTPSource", "RetryPolicy", "Source",
           "SourceError", "SplitCatalogueSource", "cache_dir", "env_var_for_host", "open_source", "redact_uri", "register_scheme", "schemes"]
