"""HTTP(S) sources: a download into the local cache with authentication, resume, retries and a timeout.

One download is a series of attempts, each a GET of the URL (``Range: bytes=N-`` when N bytes are
already in the ``.part`` file, with ``If-Range`` so that a changed resource restarts from zero):

- 5xx, 408, 429, refused or reset connections, timeouts and truncated bodies (fewer bytes than
  ``Content-Length`` said) are retried with exponential backoff, up to ``RetryPolicy.attempts``
  attempts and ``RetryPolicy.deadline`` seconds, then reported as a :class:`SourceError`;
- 401 and 403 are an :class:`AuthError` at once, naming the variable to set;
- any other 4xx is a :class:`SourceError` at once.

Only a complete body becomes a cache file; what a truncated attempt received stays in ``.part``.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import Request, urlopen

from astrobio.data.sources.auth import (AuthError, AuthSpec, Credentials, redact_uri, resolve_credentials,
                                        uri_credentials)
from astrobio.data.sources.cache import CHUNK, CacheEntry, entry_for
from astrobio.data.sources.registry import FileSource, Source, SourceError, SourceOptions, register_scheme, suffix_for

log = logging.getLogger(__name__)
USER_AGENT = "astrobio-data/1"
RETRY_STATUS = {408, 429}
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # http.client refuses these, quoting the URL (and its secrets)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5           # attempts in all (1 = no retry)
    backoff: float = 0.5        # seconds before the first retry; doubled each time
    max_backoff: float = 8.0    # cap on one wait
    deadline: float = 300.0     # no retry starts after this many seconds of the download
    timeout: float = 30.0       # socket timeout of one request (connect, and each read)

    def __post_init__(self):
        if self.attempts < 1 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError(f"retry policy {self} needs attempts >= 1, timeout > 0 and backoff >= 0")

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))


class RetryableError(Exception):
    """One attempt failed in a way another attempt may not; the message is safe to show."""


class HTTPSource(Source):
    """A URL served over HTTP(S), downloaded once into the cache and read from there."""

    def __init__(self, uri: str, options: SourceOptions, policy: RetryPolicy | None = None,
                 cache_root: Path | None = None):
        parts = urlsplit(uri)
        self.name = redact_uri(uri)
        if not parts.hostname:
            raise SourceError(f"{self.name} has no host; write it as https://host/path")
        try:
            port = parts.port
        except ValueError:
            raise SourceError(f"{self.name} has a port that is not a number; write it as "
                              "https://host:443/path") from None
        if _CONTROL.search(uri):
            raise SourceError(f"{self.name} contains spaces or control characters; percent-encode them "
                              "(a space as %20)")
        self.format = options.format_for(parts.path, parts.query)
        self.policy = policy or RetryPolicy()
        self.auth = AuthSpec(parts.hostname, options.auth, options.auth_env)
        # the request URL and cache key carry neither credentials nor our own options (the fragment)
        netloc = parts.hostname + (f":{port}" if port else "")
        self._url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        self._uri_credentials = uri_credentials(uri)  # a Credentials object: never shown, never pickled
        self.entry: CacheEntry = entry_for(self._url, suffix_for(self.format, parts.path), cache_root)

    def __repr__(self) -> str:
        return f"HTTPSource({self.name!r}, format={self.format!r})"

    def fetch(self) -> bytes:
        return self.download().read_bytes()

    def records(self, seed: int = 0) -> list[str]:
        return self.local().records(seed)

    def rows(self) -> list[dict]:
        return self.local().rows()

    def local(self) -> FileSource:
        return FileSource(self.download(), self.format, display_name=self.name)

    def download(self) -> Path:
        """The cached file, fetched first unless a verified copy is already there."""
        with self.entry.locked():
            if self.entry.verified():
                log.debug("%s: cache hit %s", self.name, self.entry.path)
                return self.entry.path
            return self.fetch_into_cache()

    def fetch_into_cache(self) -> Path:
        """The download itself, attempt after attempt (the caller holds the entry's lock)."""
        credentials = resolve_credentials(self.auth, self._uri_credentials)
        started = time.monotonic()
        for attempt in range(1, self.policy.attempts + 1):
            try:
                self.attempt(credentials)
                digest = self.entry.commit_part()
                log.info("%s: downloaded to %s (sha256 %s)", self.name, self.entry.path, digest)
                return self.entry.path
            except RetryableError as err:
                delay = self.policy.delay(attempt)
                out_of_time = time.monotonic() - started + delay > self.policy.deadline
                if attempt == self.policy.attempts or out_of_time:
                    raise SourceError(f"{self.name}: gave up after {attempt} attempt(s) in "
                                      f"{time.monotonic() - started:.1f} s: {err}; the partial download is "
                                      f"kept in {self.entry.part} and the next run resumes it") from None
                log.warning("%s: %s; retry %d of %d in %.2f s", self.name, err, attempt,
                            self.policy.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def attempt(self, credentials: Credentials | None) -> None:
        """One GET into the .part file; returns when the body is complete."""
        offset = self.entry.part_size()
        request = Request(self._url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        if credentials is not None:
            # unredirected: urllib must not forward the secret to wherever a redirect points
            request.add_unredirected_header("Authorization", credentials.header())
        if offset:
            request.add_header("Range", f"bytes={offset}-")
            validator = self.entry.part_validator()
            if validator:
                request.add_header("If-Range", validator)
        response = self.open(request, credentials, offset)
        with response:
            offset, expected = self.prepare_part(response, offset)
            received = self.copy_body(response)
        if expected is not None and offset + received != expected:
            raise RetryableError(f"truncated response: {offset + received} of {expected} bytes")

    def open(self, request: Request, credentials: Credentials | None, offset: int):
        try:
            return urlopen(request, timeout=self.policy.timeout)
        except HTTPError as err:
            err.close()
            if err.code in (401, 403):
                raise self.auth_error(err.code, credentials) from None
            if err.code == 416 and offset:
                self.entry.drop_part()  # our partial file does not fit the resource: start over
                raise RetryableError(f"HTTP 416 for a resume at byte {offset}; restarting") from None
            if err.code >= 500 or err.code in RETRY_STATUS:
                raise RetryableError(f"HTTP {err.code} {err.reason}") from None
            raise SourceError(f"{self.name} answered HTTP {err.code} {err.reason}") from None
        except (URLError, OSError, http.client.HTTPException) as err:
            raise RetryableError(f"connection failed: {describe(err)}") from None

    def auth_error(self, code: int, credentials: Credentials | None) -> AuthError:
        if credentials is None:
            return AuthError(f"{self.name} answered HTTP {code}: it needs credentials and none were found; "
                             f"{self.auth.hint()}")
        return AuthError(f"{self.name} answered HTTP {code}: it refused the credentials from "
                         f"{credentials.origin}; check them, or {self.auth.hint()}")

    def prepare_part(self, response, offset: int) -> tuple[int, int | None]:
        """Opens the .part for this response: appends after a 206 that continues it, else starts it
        anew. Returns (bytes already there, expected total or None)."""
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if response.status == 206:
            start, total = parse_content_range(response.headers.get("Content-Range", ""))
            if start == offset:
                return offset, total if total is not None else (offset + length if length is not None else None)
            raise RetryableError(f"server resumed at byte {start}, not {offset}")
        self.entry.start_part(response.headers.get("ETag") or response.headers.get("Last-Modified"))
        return 0, length

    def copy_body(self, response) -> int:
        received = 0
        with open(self.entry.part, "ab") as out:
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
            except http.client.IncompleteRead as err:
                # a chunked body cut short: keep what came (the next attempt resumes after it)
                out.write(err.partial)
                received += len(err.partial)
                raise RetryableError(f"truncated response: the connection closed after {received} bytes") from None
            except (OSError, http.client.HTTPException) as err:
                raise RetryableError(f"connection lost after {received} bytes: {describe(err)}") from None
        return received


def parse_content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); a total of ``*`` -> None."""
    try:
        _, spec = value.split(" ", 1)
        span, total = spec.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total == "*" else int(total))
    except ValueError:
        return None, None


def describe(err: BaseException) -> str:
    if isinstance(err, URLError) and not isinstance(err, HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    return f"{type(err).__name__}: {err}"


def _open_http(uri: str, options: SourceOptions, **kwargs) -> Source:
    return HTTPSource(uri, options, **kwargs)


register_scheme("http", _open_http)
register_scheme("https", _open_http)
