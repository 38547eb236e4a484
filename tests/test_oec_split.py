"""The Open Exoplanet Catalogue split by system (``oec://PATH?split=train|heldout``): a partition that
never lets a held-out system into training, the same whatever the order or the other systems; and
``evaluate`` probing the held-out side of the split a run trained on."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from astrobio.data.oec import is_held_out, parse_oec, system_record
from astrobio.data.sources import SplitCatalogueSource
from astrobio.data.sources import SourceError, open_source
from astrobio.evaluate import catalogue_source

OEC_FILE = Path(os.environ.get("ASTROBIO_OEC_FILE",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "oec_systems.xml.gz"))
needs_oec = pytest.mark.skipif(not OEC_FILE.is_file(), reason=f"the real catalogue {OEC_FILE} is absent "
                               f"(../shared/data next to the repository, or set ASTROBIO_OEC_FILE)")


def system_xml(name: str, flux_a: float = 1.0) -> str:
    return (f"<system><name>{name}</name><star><name>{name}</name><mass>1.0</mass><radius>1.0</radius>"
            f"<temperature>5772</temperature><planet><name>{name} b</name><mass>0.01</mass>"
            f"<semimajoraxis>{flux_a}</semimajoraxis></planet></star></system>")


@pytest.fixture
def catalogue(tmp_path):
    names = [f"Sys-{i}" for i in range(60)]
    path = tmp_path / "cat.xml.gz"
    path.write_bytes(gzip.compress(("<systems>" + "".join(system_xml(n) for n in names) + "</systems>").encode()))
    return path, names


def test_hash_rule_by_hand():
    digest = hashlib.sha256(b"Kepler-22").digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    assert is_held_out("Kepler-22", share + 1e-9) and not is_held_out("Kepler-22", share - 1e-9)


def test_sides_partition_the_systems_in_catalogue_order(catalogue):
    path, names = catalogue
    train = open_source(f"oec://{path}?split=train&heldout=0.3").records()
    held = open_source(f"oec://{path}?split=heldout&heldout=0.3").records()
    first = lambda records: [r.splitlines()[0].removeprefix("system: ") for r in records]  # noqa: E731
    assert sorted(first(train) + first(held)) == sorted(names)
    assert not set(first(train)) & set(first(held))
    assert first(held) == [n for n in names if is_held_out(n, 0.3)]  # the rule, in catalogue order
    assert 0 < len(held) < len(names)
    systems = parse_oec(path.read_bytes())
    assert held == [system_record(s) for s in systems if is_held_out(s.name, 0.3)]  # the corpus record format


def test_the_uri_as_a_run_stores_it_reads_the_same_side(catalogue):
    from astrobio.data.sources import redact_uri
    path, _ = catalogue
    uri = f"oec://{path}?split=heldout&heldout=0.3"
    assert path.is_absolute() and redact_uri(uri) != uri  # config.json holds oec:/abs/path
    assert open_source(redact_uri(uri)).records() == open_source(uri).records()
    uri, _ = catalogue_source(None, redact_uri(f"oec://{path}?split=train&heldout=0.3"))
    assert open_source(uri).records() == open_source(f"oec://{path}?split=heldout&heldout=0.3").records()


def test_a_system_keeps_its_side_whatever_else_is_in_the_file(catalogue, tmp_path):
    path, names = catalogue
    held = set(open_source(f"oec://{path}?split=heldout").records())
    reordered = tmp_path / "fewer.xml"
    reordered.write_text("<systems>" + "".join(system_xml(n) for n in reversed(names[::2])) + "</systems>")
    held_again = set(open_source(f"oec://{reordered}?split=heldout").records())
    assert held_again == {r for r in held if int(r.splitlines()[0].split("-")[1]) % 2 == 0}


def test_bad_split_uris_are_clear_errors(catalogue):
    path, _ = catalogue
    for uri, expected in ((f"oec://{path}", "split=train"), (f"oec://{path}?split=test", "split=train"),
                          (f"oec://{path}?split=train&seed=1", "split=train"),
                          (f"oec://{path}?split=train&heldout=1.5", "heldout=1.5"),
                          (f"oec://{path}?split=train&heldout=x", "heldout=x"),
                          (f"oec://{path}?split=train&synthetic=-3", "synthetic=-3")):
        with pytest.raises(SourceError, match=expected):
            open_source(uri).records()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"oec://{path}.missing?split=train").records()


def test_synthetic_records_follow_the_real_ones(catalogue):
    from astrobio.data.corpus import builtin_records
    path, _ = catalogue
    real = open_source(f"oec://{path}?split=train").records(seed=5)
    mixed = open_source(f"oec://{path}?split=train&synthetic=7").records(seed=5)
    assert mixed == real + builtin_records(7, seed=5)


def test_evaluate_probes_the_other_side_of_the_runs_split(catalogue):
    path, _ = catalogue
    uri, name = catalogue_source(None, f"oec://{path}?split=train&heldout=0.3&synthetic=10")
    assert name == "held-out systems of the Open Exoplanet Catalogue"
    assert isinstance(open_source(uri), SplitCatalogueSource) and open_source(uri).split == "heldout"
    assert open_source(uri).records() == open_source(f"oec://{path}?split=heldout&heldout=0.3").records()
    with pytest.raises(FileNotFoundError, match="--catalogue"):
        catalogue_source(f"oec://{path}.missing?split=heldout", "builtin")


@needs_oec
def test_real_catalogue_split():
    train = open_source(f"oec://{OEC_FILE}?split=train").records()
    held = open_source(f"oec://{OEC_FILE}?split=heldout").records()
    assert len(train) + len(held) == 4081  # shared/data/README.md
    assert 0.17 < len(held) / 4081 < 0.23  # 0.2 by default
    names = lambda records: {r.splitlines()[0] for r in records}  # noqa: E731
    assert not names(train) & names(held)
    hz_yes = sum(r.count("\nhz: yes") for r in held)
    assert hz_yes >= 20  # enough 'yes' answers among the held-out planets to score a balanced accuracy
