"""Data sources: local files, URIs and options, and HTTP downloads against a loopback server (credentials
from the environment and .netrc, never shown; retries; truncation; resume; the cache)."""

import gzip
import hashlib
import logging
import pickle
import re
import socket
import threading
import time
import traceback
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from astrobio.data.sources import (AuthError, HTTPSource, RetryPolicy, SourceError, env_var_for_host, open_source,
                                   redact_uri)
from astrobio.data.sources.auth import AuthSpec, Credentials

SECRET = "tok-7f3a9c-very-secret"
FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, timeout=2.0)
BODY = b"".join(b"line %05d of the table\n" % i for i in range(4000))  # 96 kB


@dataclass
class Route:
    body: bytes = BODY
    auth: str | None = None      # the Authorization header the route demands
    fail_first: int = 0          # answer 503 to this many requests first
    truncate_to: int | None = None
    truncate_times: int = 10**9  # how many 200/206 answers are cut at truncate_to bytes
    ranges: bool = True          # honour Range requests
    delay: float = 0.0           # seconds before answering
    etag: str = '"v1"'
    chunked: bool = False        # send the body as one chunk without the closing chunk (a cut stream)
    served: int = field(default=0)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        route = self.server.routes.get(self.path)
        self.server.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if route is None:
            return self.reply(404, b"no such table")
        time.sleep(route.delay)
        if route.auth is not None and self.headers.get("Authorization") != route.auth:
            return self.reply(401, b"unauthorized")
        if route.fail_first > 0:
            route.fail_first -= 1
            return self.reply(503, b"busy")
        start = 0
        ranged = self.headers.get("Range", "")
        if route.ranges and ranged.startswith("bytes=") and self.headers.get("If-Range", route.etag) == route.etag:
            start = int(ranged[len("bytes="):].rstrip("-"))
        payload = route.body[start:]
        self.send_response(206 if start else 200)
        if route.chunked and route.served < route.truncate_times:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", route.etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
        self.end_headers()
        if route.truncate_to is not None and route.served < route.truncate_times:
            payload = payload[:route.truncate_to]
        if route.chunked and route.served < route.truncate_times:
            payload = b"%x\r\n" % len(payload) + payload + b"\r\n"
        route.served += 1
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass

    def reply(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.seen = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real .netrc, no stray token variables, a private cache."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(env_var_for_host("127.0.0.1"), raising=False)
    monkeypatch.setenv("ASTROBIO_CACHE_DIR", str(tmp_path / "cache"))


TOKEN_VAR = "ASTROBIO_TOKEN_127_0_0_1"


def test_env_var_name_is_derived_from_the_host():
    assert env_var_for_host("127.0.0.1") == TOKEN_VAR
    assert env_var_for_host("exoplanetarchive.ipac.caltech.edu") == "ASTROBIO_TOKEN_EXOPLANETARCHIVE_IPAC_CALTECH_EDU"


def test_bearer_token_from_the_environment_gives_the_data(server, monkeypatch):
    server.routes["/t.csv"] = Route(auth=f"Bearer {SECRET}")
    monkeypatch.setenv(TOKEN_VAR, SECRET)
    assert open_source(server.url + "/t.csv", policy=FAST).fetch() == BODY
    assert server.seen[-1]["authorization"] == f"Bearer {SECRET}"


def test_missing_credentials_name_the_source_and_the_variable(server):
    server.routes["/t.csv"] = Route(auth=f"Bearer {SECRET}")
    with pytest.raises(AuthError) as info:
        open_source(server.url + "/t.csv", policy=FAST).fetch()
    message = str(info.value)
    assert f"{server.url}/t.csv answered HTTP 401" in message
    assert "none were found" in message and TOKEN_VAR in message and ".netrc" in message
    assert len(server.seen) == 1  # an auth failure is not retried


def test_wrong_secret_appears_in_no_output_log_exception_or_cache_file(server, monkeypatch, caplog, capsys, tmp_path):
    wrong = "wrong-" + SECRET
    server.routes["/t.csv"] = Route(auth="Bearer the-right-one")
    server.routes["/open.csv"] = Route(fail_first=1)
    monkeypatch.setenv(TOKEN_VAR, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError) as info:
        open_source(server.url + "/t.csv", policy=FAST).fetch()
    assert server.seen[-1]["authorization"] == f"Bearer {wrong}"  # it was sent...
    assert f"refused the credentials from environment variable {TOKEN_VAR}" in str(info.value)
    source = open_source(server.url + "/open.csv", policy=FAST)  # a retry logs a warning, with the token set
    assert source.fetch() == BODY
    shown = "".join(traceback.format_exception(info.value)) + repr(info.value) + repr(source) + caplog.text
    shown += "".join(r.getMessage() for r in caplog.records) + "".join(capsys.readouterr())
    assert "retry 1 of 2" in caplog.text
    assert SECRET not in shown  # ...and shown nowhere
    assert all(SECRET.encode() not in p.read_bytes() for p in (tmp_path / "cache").iterdir())


def test_basic_auth_from_a_named_variable(server, monkeypatch):
    server.routes["/t.csv"] = Route(auth="Basic " + b64encode(b"alice:" + SECRET.encode()).decode())
    monkeypatch.setenv("MY_ARCHIVE_LOGIN", "alice:" + SECRET)
    source = open_source(server.url + "/t.csv#auth=basic&auth_env=MY_ARCHIVE_LOGIN", policy=FAST)
    assert source.fetch() == BODY


def test_basic_auth_from_netrc_in_home(server, tmp_path):
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine 127.0.0.1\n  login alice\n  password {SECRET}\n")
    netrc.chmod(0o600)
    server.routes["/t.csv"] = Route(auth="Basic " + b64encode(b"alice:" + SECRET.encode()).decode())
    assert open_source(server.url + "/t.csv", policy=FAST).fetch() == BODY
    server.routes["/u.csv"] = server.routes["/t.csv"]  # a run's saved config holds the URI redacted
    redacted = redact_uri(f"http://alice:{SECRET}@127.0.0.1:{server.server_address[1]}/u.csv")
    assert open_source(redacted, policy=FAST).fetch() == BODY


def test_user_and_password_in_the_uri_are_sent_but_never_shown(server, caplog):
    server.routes["/t.csv"] = Route(auth="Basic " + b64encode(b"alice:" + SECRET.encode()).decode())
    port = server.server_address[1]
    assert open_source(f"http://alice:{SECRET}@127.0.0.1:{port}/t.csv", policy=FAST).fetch() == BODY
    caplog.set_level(logging.DEBUG)
    server.routes["/u.csv"] = server.routes["/t.csv"]
    wrong = open_source(f"http://alice:wrong{SECRET}@127.0.0.1:{port}/u.csv", policy=FAST)
    refused = r"http://\*\*\*@127.0.0.1:\d+/u.csv answered HTTP 401.*the URI's user:password"
    with pytest.raises(AuthError, match=refused):
        wrong.fetch()
    assert SECRET not in repr(wrong) + caplog.text
    with pytest.raises(TypeError):
        pickle.dumps(wrong)


def test_netrc_parse_error_does_not_quote_the_file(tmp_path):
    (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login alice password\n{SECRET} stray {SECRET}\n")
    from astrobio.data.sources.auth import resolve_credentials

    with pytest.raises(AuthError) as info:
        resolve_credentials(AuthSpec("127.0.0.1"))
    assert "cannot parse" in str(info.value) and SECRET not in str(info.value)


def test_credentials_hide_their_secret_and_refuse_to_be_pickled():
    creds = Credentials("bearer", "environment variable X", SECRET)
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    assert creds.header() == f"Bearer {SECRET}"
    with pytest.raises(TypeError, match="never reach a file"):
        pickle.dumps(creds)


def test_userinfo_and_secret_query_values_are_redacted():
    uri = f"https://alice:{SECRET}@data.example.org/x.csv?api_key={SECRET}&table=ps#format=csv"
    shown = redact_uri(uri)
    assert SECRET not in shown
    assert shown == "https://***@data.example.org/x.csv?api_key=***&table=ps#format=csv"
    assert SECRET not in repr(open_source(uri))


def test_server_errors_are_retried_then_served(server):
    server.routes["/t.csv"] = Route(fail_first=2)
    assert open_source(server.url + "/t.csv", policy=FAST).fetch() == BODY
    assert len(server.seen) == 3


def test_persistent_server_errors_are_reported_after_bounded_attempts(server):
    server.routes["/t.csv"] = Route(fail_first=100)
    source = open_source(server.url + "/t.csv", policy=FAST)
    with pytest.raises(SourceError, match=r"gave up after 3 attempt\(s\).*HTTP 503"):
        source.fetch()
    assert len(server.seen) == 3 and not source.entry.path.exists()


def test_client_errors_are_not_retried(server):
    with pytest.raises(SourceError, match="answered HTTP 404"):
        open_source(server.url + "/missing.csv", policy=FAST).fetch()
    assert len(server.seen) == 1


def test_refused_connection_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SourceError, match="gave up after 2 attempt.*connection failed"):
        open_source(f"http://127.0.0.1:{port}/t.csv", policy=RetryPolicy(attempts=2, backoff=0.01)).fetch()


def test_a_slow_server_times_out_and_is_reported(server):
    server.routes["/slow.csv"] = Route(delay=0.6)
    policy = RetryPolicy(attempts=2, backoff=0.01, timeout=0.2)
    with pytest.raises(SourceError, match="timed out"):
        open_source(server.url + "/slow.csv", policy=policy).fetch()


def test_truncated_response_is_detected_and_not_cached(server):
    server.routes["/t.csv"] = Route(truncate_to=1000, ranges=False)
    source = open_source(server.url + "/t.csv", policy=FAST)
    with pytest.raises(SourceError, match=f"truncated response: 1000 of {len(BODY)} bytes"):
        source.fetch()
    assert len(server.seen) == 3
    assert not source.entry.path.exists() and not source.entry.sidecar.exists()
    assert source.entry.part.stat().st_size == 1000  # kept for the next attempt to resume


def test_truncated_response_resumes_with_a_range_request(server):
    server.routes["/t.csv"] = Route(truncate_to=5000, truncate_times=1)
    source = open_source(server.url + "/t.csv", policy=FAST)
    assert source.fetch() == BODY
    assert [r.get("range") for r in server.seen] == [None, "bytes=5000-"]
    assert server.seen[1]["if-range"] == '"v1"'


def test_a_chunked_body_cut_short_is_retried_and_resumed(server):
    server.routes["/t.csv"] = Route(chunked=True, truncate_to=5000, truncate_times=1)
    source = open_source(server.url + "/t.csv", policy=FAST)
    assert source.fetch() == BODY
    assert [r.get("range") for r in server.seen] == [None, "bytes=5000-"]


def test_resume_from_a_partial_file_left_by_an_earlier_run(server):
    server.routes["/t.csv"] = Route()
    source = open_source(server.url + "/t.csv", policy=FAST)
    source.entry.start_part('"v1"')
    source.entry.part.write_bytes(BODY[:12345])
    assert source.fetch() == BODY
    assert server.seen[0]["range"] == "bytes=12345-" and len(server.seen) == 1
    digest = hashlib.sha256(BODY).hexdigest()
    assert source.entry.sidecar.read_text() == f"{digest}  {source.entry.path.name}\n"
    assert not source.entry.part.exists()


def test_a_changed_resource_restarts_the_partial_download(server):
    server.routes["/t.csv"] = Route(etag='"v2"')
    source = open_source(server.url + "/t.csv", policy=FAST)
    source.entry.start_part('"v1"')
    source.entry.part.write_bytes(b"stale bytes of the old version")
    assert source.fetch() == BODY


def test_concurrent_downloads_of_one_url_share_one_request(server):
    """Two pipeline ranks open the same --data URL at once: one downloads, the other waits for the cache."""
    server.routes["/t.csv"] = Route(delay=0.3)
    sources = [open_source(server.url + "/t.csv", policy=FAST) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        bodies = list(pool.map(lambda source: source.fetch(), sources))
    assert bodies == [BODY, BODY] and len(server.seen) == 1


def test_cache_hit_avoids_a_request_and_a_corrupted_file_is_fetched_again(server):
    server.routes["/t.csv"] = Route()
    url = server.url + "/t.csv"
    assert open_source(url, policy=FAST).fetch() == BODY
    assert open_source(url, policy=FAST).fetch() == BODY
    assert len(server.seen) == 1
    source = open_source(url, policy=FAST)
    source.entry.path.write_bytes(BODY[:-1] + b"!")
    assert source.fetch() == BODY
    assert len(server.seen) == 2


def test_a_table_service_answers_csv_rows_and_records(server):
    server.routes["/TAP/sync?query=select+pl_name,pl_bmasse+from+ps&format=csv"] = Route(
        body=b"pl_name,pl_bmasse\nKepler-22 b,9.1\nTRAPPIST-1 e,0.69\n")
    source = open_source(server.url + "/TAP/sync?query=select+pl_name,pl_bmasse+from+ps&format=csv", policy=FAST)
    assert isinstance(source, HTTPSource) and source.format == "csv"
    assert source.rows() == [{"pl_name": "Kepler-22 b", "pl_bmasse": "9.1"},
                             {"pl_name": "TRAPPIST-1 e", "pl_bmasse": "0.69"}]
    assert source.records() == ["pl_name: Kepler-22 b\npl_bmasse: 9.1", "pl_name: TRAPPIST-1 e\npl_bmasse: 0.69"]
    assert source.entry.path.suffix == ".csv"


def test_local_csv_and_jsonl_rows(tmp_path):
    (tmp_path / "p.csv").write_text("# a comment line\nname,mass\nb,1.5\nc,\n")
    (tmp_path / "p.jsonl").write_text('{"name": "b", "mass": 1.5}\n\n{"name": "c"}\n')
    assert open_source(tmp_path / "p.csv").rows() == [{"name": "b", "mass": "1.5"}, {"name": "c", "mass": ""}]
    assert open_source(f"file://{tmp_path}/p.jsonl").rows() == [{"name": "b", "mass": 1.5}, {"name": "c"}]
    assert open_source(tmp_path / "p.csv").records() == ["name: b\nmass: 1.5", "name: c"]


@pytest.mark.parametrize("line, message", [('{"text": ', "line 2: not valid JSON"),
                                           ("[1, 2]", "line 2: expected a JSON object")])
def test_jsonl_rows_and_records_refuse_a_bad_line_alike(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "first"}\n' + line + "\n")
    for read in (open_source(path).rows, open_source(path).records):
        with pytest.raises(ValueError, match=re.escape(f"data file {path}, {message}")):
            read()


def test_gzipped_files_and_a_format_option_read_like_their_plain_twins(tmp_path):
    plain = {"p.csv": "name,mass\nb,1.5\n", "p.jsonl": '{"text": "first"}\n{"text": "second"}\n',
             "p.txt": "one record\n\nanother record\n"}
    for name, text in plain.items():
        (tmp_path / name).write_text(text)
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
        assert open_source(tmp_path / (name + ".gz")).records() == open_source(tmp_path / name).records()
    assert open_source(tmp_path / "p.csv.gz").rows() == [{"name": "b", "mass": "1.5"}]
    (tmp_path / "notes.log").write_text(plain["p.txt"])
    assert open_source(f"{tmp_path}/notes.log#format=text").records() == ["one record", "another record"]


def test_uri_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="cannot tell the format of .*data.bin.*#format="):
        open_source(tmp_path / "data.bin")
    with pytest.raises(SourceError, match="unknown option 'retries'.*format, auth, auth_env"):
        open_source("https://example.org/t.csv#retries=3")
    with pytest.raises(SourceError, match="unknown scheme 'ftp'"):
        open_source("ftp://example.org/t.csv")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "absent.csv").fetch()
    with pytest.raises(SourceError, match="port that is not a number"):
        open_source("https://example.org:x/t.csv")


def test_malformed_uris_are_refused_without_quoting_their_secrets(caplog):
    for uri in (f"https://127.0.0.1:9/a b.csv?api_key={SECRET}", f"file://user:{SECRET}@host/t.csv"):
        with caplog.at_level(logging.DEBUG), pytest.raises(SourceError) as raised:
            open_source(uri, policy=FAST).fetch()
        assert SECRET not in str(raised.value) and SECRET not in caplog.text
    with pytest.raises(SourceError, match="percent-encode"):
        open_source("https://example.org/a b.csv")


def test_builtin_source_records_and_rows_describe_the_same_systems():
    from astrobio.data import parse_record

    source = open_source("builtin:5")
    records = source.records(seed=2)
    rows = source.rows(seed=2)
    planets = [(parse_record(r)["star"], p) for r in records for p in parse_record(r)["planets"]]
    assert len(records) == 5 and len(rows) == len(planets)
    for row, (star, planet) in zip(rows, planets):
        assert (row["planet_mass"], row["semimajor_axis"], row["star_temperature"]) == (
            planet["mass"], planet["a"], star["star_teff"])
    assert source.fetch() == "\n\n".join(source.records()).encode()


def test_an_oec_file_gives_records_and_planet_rows(tmp_path):
    path = tmp_path / "mini.xml"
    path.write_text("<systems><system><name>S</name><distance>10</distance><star><name>S</name><mass>0.5</mass>"
                    "<planet><name>S b</name><mass>2</mass><period>3.5</period></planet></star>"
                    "<binary><planet><name>S c</name><radius upperlimit='1'/></planet></binary></system></systems>")
    source = open_source(path)
    assert source.format == "oec" and source.records()[0].startswith("system: S\ndistance: 10")
    b, c = source.rows()
    assert (b["name"], b["planet_mass"], b["period"], b["star_mass"]) == ("S b", 2 * 317.83, 3.5, 0.5)
    assert b["distance"] == 10
    assert (c["name"], c["planet_radius"], c["star_mass"], c["distance"]) == ("S c", None, None, 10)
