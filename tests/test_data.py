"""Data: tokenizers, the built-in corpus's physics, the Open Exoplanet Catalogue reader, text/JSONL
files, token splits and the packed loader (determinism, epochs, exact resume), and input errors."""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from astrobio.data import (
    DERIVED_FIELDS,
    ByteTokenizer,
    PackedLoader,
    build_token_splits,
    derive,
    field_completions,
    format_record,
    generate_system,
    load_records,
    load_tokenizer,
    parse_record,
    read_oec,
    split_records,
)
from astrobio.data.oec import parse_oec, system_record

REPO_ROOT = Path(__file__).resolve().parents[1]
OEC_FILE = REPO_ROOT.parent / "shared" / "data" / "oec_systems.xml.gz"
needs_oec = pytest.mark.skipif(
    not OEC_FILE.is_file(), reason=f"the real catalogue {OEC_FILE} is absent (../shared/data next to the repository)"
)

# Physical constants, written here independently of the package.
AU_M = 1.495978707e11
RSUN_M = 6.957e8
MJUP_MEARTH = 1.89813e27 / 5.9722e24
RJUP_REARTH = 7.1492e7 / 6.3781e6


def fields_of(record: str) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in record.splitlines()]


def blocks_of(record: str) -> tuple[dict, list[dict]]:
    """The star block and planet blocks of a built-in record, values as text (a parser of its own)."""
    star: dict = {}
    planets: list[dict] = []
    for key, value in fields_of(record):
        if key == "planet":
            planets.append({})
        (planets[-1] if planets else star)[key] = value
    return star, planets


def sig_close(printed: str, exact: float, digits: int = 3) -> bool:
    """``printed`` is ``exact`` rounded to ``digits`` significant digits (half a unit of the last digit)."""
    unit = 10 ** (math.floor(math.log10(abs(exact))) - digits + 1)
    return abs(float(printed) - exact) <= 0.5 * unit + 1e-6 * abs(exact)  # 1e-6: constants differ in their last digits


# --------------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("text", ["", "Température d'équilibre: 255 K", "α Cen b ☉ 🪐", "行星\n\tend"])
def test_byte_tokenizer_round_trips_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)


def test_byte_decode_drops_specials_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([256, *"é".encode(), 257, 258]) == "é"
    assert tok.decode([256, 0xC3, 257]) == "\ufffd"  # a character cut in half
    with pytest.raises(ValueError, match="259"):
        tok.decode([259])


def test_byte_encode_records_equals_per_record_encoding():
    tok = ByteTokenizer()
    texts = ["a", "", "naïve ☉", "x\ny"]
    expected = []
    for text in texts:
        expected += [256, *text.encode("utf-8"), 257]
    assert tok.encode_records(texts).tolist() == expected


@pytest.fixture
def hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
    from tokenizers import models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, "hz": 4, ":": 5, "yes": 6, "no": 7, "planet": 8, "b": 9}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def test_hf_tokenizer_json_behind_the_same_interface(hf_tokenizer_file):
    path, raw = hf_tokenizer_file
    for where in (path, path.parent):  # the file or the folder holding it
        tok = load_tokenizer(str(where))
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 10)
        text = "planet b hz : yes"
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids == [8, 9, 4, 5, 6]
        assert tok.decode([0, 4, 5, 7, 1]) == "hz : no"
        train, val = build_token_splits(["hz : yes", "hz : no"], tok, val_fraction=0.0)
        assert train.tolist() == [0, 4, 5, 6, 1, 0, 4, 5, 7, 1] and val.numel() == 0


def test_load_tokenizer_errors_name_the_file(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(str(missing))
    pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        load_tokenizer(str(corrupt))
    corrupt.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(corrupt))


# ------------------------------------------------------------------------------------------------ corpus


@pytest.fixture(scope="module")
def default_corpus():
    return load_records("builtin")


def test_builtin_corpus_is_deterministic_in_the_seed(default_corpus):
    assert len(default_corpus) == 20000
    assert load_records("builtin:40", seed=0) == default_corpus[:40]
    assert load_records("builtin:40", seed=7) == load_records("builtin:40", seed=7) != default_corpus[:40]
    rng = random.Random(0)
    assert [format_record(generate_system(rng)) for _ in range(40)] == default_corpus[:40]
    assert len(set(default_corpus)) == len(default_corpus)


def test_builtin_records_follow_the_physics(default_corpus):
    """Recompute every derived field from the record's own printed inputs, with formulas written here."""
    hz_answers = Counter()
    for record in default_corpus[:2000]:
        star, planets = blocks_of(record)
        mass, radius, teff = (float(star[k]) for k in ("star_mass", "star_radius", "star_teff"))
        lum = float(star["luminosity"])
        assert sig_close(star["luminosity"], radius**2 * (teff / 5772.0) ** 4)
        assert sig_close(star["hz_inner"], math.sqrt(lum / 1.11)) and sig_close(star["hz_outer"], math.sqrt(lum / 0.36))
        letter = next(c for c, low in (("A", 7500), ("F", 6000), ("G", 5200), ("K", 3700), ("M", 2400)) if teff >= low)
        assert star["spectral_type"][0] == letter and star["spectral_type"].endswith("V")
        assert 1 <= len(planets) <= 3
        previous_a = 0.0
        for p in planets:
            a, albedo, m, r = (float(p[k]) for k in ("a", "albedo", "mass", "radius"))
            assert a >= previous_a
            previous_a = a
            assert sig_close(p["period"], 365.25 * math.sqrt(a**3 / mass))  # Kepler III, P in days
            flux = lum / a**2
            assert sig_close(p["flux"], flux)
            teq = teff * math.sqrt(radius * RSUN_M / (2 * a * AU_M)) * (1 - albedo) ** 0.25
            assert sig_close(p["teq"], teq)
            assert sig_close(p["density"], 5.514 * m / r**3)
            assert p["type"] == ("terran" if m < 2.04 else "neptunian" if m < 132 else "jovian")
            assert p["hz"] == ("yes" if 0.36 <= float(p["flux"]) <= 1.11 else "no")
            hz_answers[p["hz"]] += 1
    # both answers of the habitable-zone probe are common: a model cannot score by always answering one
    assert min(hz_answers.values()) / sum(hz_answers.values()) > 0.15


def test_earth_around_the_sun_is_derived_right():
    sun_earth = {
        "system": "Sol",
        "star": {"star_mass": 1.0, "star_radius": 1.0, "star_teff": 5772.0},
        "planets": [{"planet": "b", "mass": 1.0, "radius": 1.0, "albedo": 0.3, "a": 1.0}],
    }
    system = derive(sun_earth)
    assert system["star"]["spectral_type"] == "G2V" and system["star"]["luminosity"] == 1.0
    earth = system["planets"][0]
    assert earth["period"] == 365.0 and earth["flux"] == 1.0 and earth["hz"] == "yes"
    assert earth["type"] == "terran" and earth["density"] == 5.51
    assert earth["teq"] == 255.0  # the textbook 255 K for Bond albedo 0.3


STAR_KEYS = ("star_mass", "star_radius", "star_teff", "spectral_type", "luminosity", "hz_inner", "hz_outer")
PLANET_KEYS = ("planet", "mass", "type", "radius", "albedo", "a", "period", "flux", "hz", "teq", "density")


def test_record_layout_puts_derived_fields_after_their_inputs(default_corpus):
    for record in default_corpus[:50]:
        keys = [key for key, _ in fields_of(record)]
        starts = [i for i, k in enumerate(keys) if k == "planet"]
        star_keys = keys[1 : starts[0]]
        assert keys[0] == "system"
        assert star_keys == list(STAR_KEYS)
        blocks = [star_keys] + [keys[i : i + 11] for i in starts]
        assert len(keys) == 1 + 7 + 11 * len(starts)
        for block in blocks[1:]:
            assert block == list(PLANET_KEYS)
        for block in blocks:
            for index, key in enumerate(block):
                inputs = DERIVED_FIELDS[key].inputs if key in DERIVED_FIELDS else ()
                assert all(name in block[:index] or (block is not star_keys and name in star_keys) for name in inputs)


def test_truth_functions_reproduce_records_and_probe_pairs(default_corpus):
    for record in default_corpus[:200]:
        system = parse_record(record)
        assert format_record(system) == record
        star_text, planets_text = blocks_of(record)
        for key in ("spectral_type", "luminosity", "hz_inner", "hz_outer"):
            assert DERIVED_FIELDS[key].truth(system["star"]) == star_text[key]
        for planet, planet_text in zip(system["planets"], planets_text):
            for key in ("period", "flux", "teq", "density", "type", "hz"):
                assert DERIVED_FIELDS[key].truth({**system["star"], **planet}) == planet_text[key]
        pairs = field_completions(record, "hz")
        assert len(pairs) == len(system["planets"])
        for (prompt, answer), planet in zip(pairs, system["planets"]):
            assert prompt.endswith("\nhz: ") and answer == planet["hz"]
            assert record.startswith(prompt + answer)
    assert DERIVED_FIELDS["hz"].truth({"flux": "unknown"}) is None
    assert DERIVED_FIELDS["period"].truth({"a": 1.0}) is None


# ----------------------------------------------------------------------------------------------- OEC


BINARY_XML = b"""<systems>
<system>
  <name>Test Twin</name>
  <distance errorminus="0.5" errorplus="0.7">12.0</distance>
  <binary>
    <name>Test Twin AB</name>
    <separation unit="arcsec">0.2</separation>
    <separation unit="AU">0.1</separation>
    <star><name>Test Twin A</name><mass>0.5</mass><radius>1.0</radius><temperature>5772</temperature></star>
    <binary>
      <name>Test Twin BC</name>
      <star><name>Test Twin B</name><mass>0.3</mass><radius>0.5</radius><temperature>5772</temperature></star>
      <star><name>Test Twin C</name><mass>0.2</mass><radius>0.5</radius><temperature>5772</temperature>
        <planet><name>Test Twin C b</name><mass>0.001</mass><radius>0.2</radius><period>10</period></planet>
      </star>
    </binary>
    <planet><name>Test Twin AB b</name><mass type="msini">1.0</mass><semimajoraxis>2.0</semimajoraxis></planet>
  </binary>
  <planet><name>Rogue</name><mass upperlimit="0.5"/></planet>
</system>
</systems>"""


def test_oec_binary_nests_host_sums_and_orphans():
    (system,) = parse_oec(BINARY_XML, "twin.xml")
    assert [p.name for p in system.walk("planet")] == ["Test Twin C b", "Test Twin AB b", "Rogue"]
    assert len(list(system.walk("star"))) == 3 and len(list(system.walk("binary"))) == 2
    distance = system.quantities["distance"]
    assert (distance.value, distance.errorminus, distance.errorplus) == (12.0, 0.5, 0.7)
    fields = fields_of(system_record(system))
    values = dict(fields)
    assert values["separation"] == "0.100"  # the AU separation, not the angular one
    # S-type planet of star C (0.2 Msun): a from Kepler's third law, in AU
    c_b = _planet_block(fields, "b", 0)
    assert sig_close(c_b["a"], (0.2 * (10 / 365.25) ** 2) ** (1 / 3))
    assert sig_close(c_b["mass"], 0.001 * MJUP_MEARTH) and sig_close(c_b["radius"], 0.2 * RJUP_REARTH)
    assert c_b["type"] == "terran"  # 0.32 Earth masses
    # P-type planet around the whole binary: total mass 1.0 Msun, total luminosity 1 + 0.25 + 0.25 Lsun
    ab_b = _planet_block(fields, "b", 1)
    assert ab_b["host"] == "Test Twin AB" and "msini" in ab_b and "type" not in ab_b
    assert sig_close(ab_b["period"], 365.25 * math.sqrt(2.0**3 / 1.0))
    assert sig_close(ab_b["flux"], 1.5 / 2.0**2) and ab_b["hz"] == "yes"
    rogue = _planet_block(fields, "Rogue", 0)
    assert rogue["host"] == "none" and rogue["mass"] == "<159" and set(rogue) == {"planet", "host", "mass"}


def _planet_block(fields: list[tuple[str, str]], name: str, occurrence: int) -> dict:
    starts = [i for i, (k, v) in enumerate(fields) if k == "planet"]
    chosen = [i for i in starts if fields[i][1] == name][occurrence]
    end = next((i for i in starts if i > chosen), len(fields))
    end = next((i for i in range(chosen + 1, end) if fields[i][0] in ("star", "binary")), end)
    return dict(fields[chosen:end])


def test_oec_limits_missing_values_and_single_system_root(tmp_path):
    xml = b"""<system><name>Lim</name>
      <star><name>Lim</name><mass>0.8</mass><temperature>5000</temperature><spectraltype>K2 V</spectraltype>
        <planet><name>Lim b</name><mass lowerlimit="13" upperlimit="16"/><eccentricity upperlimit="0.3"/>
          <period>365.25</period><temperature lowerlimit="920" upperlimit="1540">1230</temperature></planet>
        <planet><name>Lim c</name><radius>0.1</radius></planet>
      </star></system>"""
    path = tmp_path / "lim.xml.gz"
    path.write_bytes(gzip.compress(xml))
    (record,) = load_records(str(path))
    values = dict(fields_of(record))
    # no radius: no luminosity, no habitable zone, no flux; the given spectral type is kept
    assert "luminosity" not in values and "hz_inner" not in values and values["spectral_type"] == "K2 V"
    b = _planet_block(fields_of(record), "b", 0)
    assert b["mass"] == "4130..5090" and b["eccentricity"] == "<0.300" and b["teq"] == "1230"
    assert sig_close(b["a"], 0.8 ** (1 / 3)) and "type" not in b and "flux" not in b
    c = _planet_block(fields_of(record), "c", 0)
    assert set(c) == {"planet", "radius"}  # nothing to derive from a radius alone


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"<systems><system><name>x</name>", "not well-formed XML"),
        (b"<planets><planet/></planets>", "root element <planets>"),
        (b"<systems></systems>", "no <system>"),
        (b"<system><star><mass>heavy</mass></star></system>", "'heavy', not a number"),
        (
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
            b"<systems><system><name>&lol2;</name></system></systems>",
            "DOCTYPE",
        ),
        (gzip.compress(b"<systems><system/></systems>")[:-12], "corrupt gzip"),
    ],
)
def test_oec_bad_input_is_refused_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "bad.xml.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_records(str(path))
    assert str(path) in str(err.value)


@needs_oec
def test_real_catalogue_keeps_every_system_and_planet():
    raw = gzip.decompress(OEC_FILE.read_bytes()).decode("utf-8")
    expected_systems, expected_planets = raw.count("<system>"), raw.count("<planet>")
    assert (expected_systems, expected_planets) == (4081, 5414)  # shared/data/README.md
    systems = read_oec(OEC_FILE)
    assert len(systems) == expected_systems
    assert sum(len(list(s.walk("planet"))) for s in systems) == expected_planets
    records = [system_record(system) for system in systems]  # what load_records returns for the file
    assert len(records) == expected_systems
    assert sum(len([k for k, _ in fields_of(r) if k == "planet"]) for r in records) == expected_planets
    solar = next(r for r in records if r.startswith("system: Sun\n"))
    earth = _planet_block(fields_of(solar), "Earth", 0)
    assert earth["hz"] == "yes" and abs(float(earth["period"]) - 365.25) < 1 and earth["type"] == "terran"
    # every printed habitable-zone answer agrees with its planet's printed flux
    answers = 0
    for record in records:
        flux = None
        for key, value in fields_of(record):
            if key == "planet":
                flux = None
            elif key == "flux":
                flux = float(value)
            elif key == "hz":
                assert value == ("yes" if 0.36 <= flux <= 1.11 else "no")
                answers += 1
    assert answers > 1000


# ------------------------------------------------------------------------------------------ text files


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first record\nsecond line\r\n\r\n  \n\nsecond record\n\n\n", encoding="utf-8")
    assert load_records(str(txt)) == ["first record\nsecond line", "second record"]
    jsonl = tmp_path / "docs.jsonl.gz"
    lines = [json.dumps({"text": "Kepler-442b ☉"}), "", json.dumps({"text": "", "id": 2}), json.dumps({"text": "b"})]
    jsonl.write_bytes(gzip.compress("\n".join(lines).encode()))
    assert load_records(str(jsonl)) == ["Kepler-442b ☉", "b"]


@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("empty.txt", b"\n \n\n", ValueError, "holds no text records"),
        ("latin.txt", "caf\xe9".encode("latin-1"), ValueError, "not UTF-8"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', ValueError, "line 2: not valid JSON"),
        ("notext.jsonl", b'{"body": "x"}\n', ValueError, 'string field "text"'),
        ("blank.jsonl", b'{"text": "  "}\n', ValueError, "holds no record"),
        ("table.csv", b"a,b\n1,2\n", ValueError, "unsupported format '.csv'"),
    ],
)
def test_bad_data_files_name_the_file(tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=re.escape(message)) as err:
        load_records(str(path))
    assert str(path) in str(err.value)


def test_bad_uris(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.txt"))):
        load_records(str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="not a file"):
        load_records(str(tmp_path))
    for uri in ("builtin:0", "builtin:ten", "builtin:-3"):
        with pytest.raises(ValueError, match="positive whole number"):
            load_records(uri)


# ----------------------------------------------------------------------------------- splits and loader


def _documents(stream: torch.Tensor, tok: ByteTokenizer) -> list[str]:
    ids = stream.tolist()
    docs, start = [], None
    for i, t in enumerate(ids):
        if t == tok.bos_id:
            assert start is None
            start = i + 1
        elif t == tok.eos_id:
            docs.append(tok.decode(ids[start:i]))
            start = None
    assert start is None and (not ids or (ids[0] == tok.bos_id and ids[-1] == tok.eos_id))
    return docs


def test_token_splits_are_by_record_and_deterministic():
    tok = ByteTokenizer()
    records = load_records("builtin:200", seed=1)
    train, val = build_token_splits(records, tok, val_fraction=0.05, seed=3)
    assert train.dtype == val.dtype == torch.int64 and train.dim() == val.dim() == 1
    train_docs, val_docs = _documents(train, tok), _documents(val, tok)
    assert len(val_docs) == 10 and sorted(train_docs + val_docs) == sorted(records)
    assert train_docs == [r for r in records if r not in set(val_docs)]  # original order kept
    assert split_records(records, 0.05, seed=3) == (train_docs, val_docs)
    again = build_token_splits(records, tok, val_fraction=0.05, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert _documents(build_token_splits(records, tok, val_fraction=0.05, seed=4)[1], tok) != val_docs
    assert len(_documents(build_token_splits(records[:3], tok, val_fraction=0.05)[1], tok)) == 1
    assert build_token_splits(records[:3], tok, val_fraction=0.0)[1].numel() == 0
    with pytest.raises(ValueError, match="cannot be split"):
        build_token_splits(records[:1], tok)
    with pytest.raises(ValueError, match="val_fraction"):
        build_token_splits(records, tok, val_fraction=1.0)


def _windows(tokens: torch.Tensor, seq_len: int) -> list[tuple[int, ...]]:
    count = (len(tokens) - 1) // seq_len
    return [tuple(tokens[w * seq_len : w * seq_len + seq_len + 1].tolist()) for w in range(count)]


def _batch_windows(inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(x.tolist()) + (int(y[-1]),) for x, y in zip(inputs, targets)]


def test_packed_loader_covers_each_window_once_per_epoch_and_wraps():
    tokens = torch.randint(0, 259, (1000,), generator=torch.Generator().manual_seed(0))
    loader = PackedLoader(tokens, seq_len=16, micro_batch_size=4, seed=5)
    windows = _windows(tokens, 16)
    assert loader.batches_per_epoch == len(windows) // 4 == 15
    epochs = []
    for epoch in range(2):
        seen = []
        for position in range(loader.batches_per_epoch):
            assert (loader.epoch, loader.position) == (epoch, position)
            inputs, targets = next(loader)
            assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.int64
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            seen += _batch_windows(inputs, targets)
        epochs.append(seen)
        assert len(set(seen)) == 60 and set(seen) <= set(windows)  # 62 windows, 2 left over
    assert (loader.epoch, loader.position) == (2, 0)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    in_order = PackedLoader(tokens, seq_len=16, micro_batch_size=4, seed=5, shuffle=False)
    assert _batch_windows(*next(in_order)) == windows[:4]


def test_packed_loader_is_seeded():
    tokens = torch.arange(5000) % 259
    a, b, c = (PackedLoader(tokens, 32, 8, seed=s) for s in (1, 1, 2))
    batches_a, batches_b, batches_c = ([next(x)[0] for _ in range(5)] for x in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c))


def test_packed_loader_resume_sees_the_uninterrupted_batches():
    tokens = torch.randint(0, 259, (400,), generator=torch.Generator().manual_seed(1))
    straight = PackedLoader(tokens, seq_len=10, micro_batch_size=3, seed=9)  # 39 windows: 13 batches an epoch
    reference = [next(straight) for _ in range(30)]  # crosses two epoch boundaries
    first = PackedLoader(tokens, seq_len=10, micro_batch_size=3, seed=9)
    for _ in range(12):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = PackedLoader(tokens, seq_len=10, micro_batch_size=3, seed=9)
    resumed.load_state_dict(saved)
    for inputs, targets in reference[12:]:
        x, y = next(resumed)
        assert torch.equal(x, inputs) and torch.equal(y, targets)
    other = PackedLoader(tokens, seq_len=10, micro_batch_size=4, seed=9)
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="num_tokens"):
        PackedLoader(tokens[:-20], seq_len=10, micro_batch_size=3, seed=9).load_state_dict(saved)
    with pytest.raises(ValueError, match="fingerprint"):
        PackedLoader((tokens + 1) % 259, seq_len=10, micro_batch_size=3, seed=9).load_state_dict(saved)


def test_packed_loader_refuses_too_short_streams():
    short = PackedLoader(torch.arange(64), seq_len=64, micro_batch_size=1, seed=0)
    assert short.batches_per_epoch == 0
    with pytest.raises(ValueError, match="shorter than one window of seq_len \\+ 1 = 65"):
        next(short)
    few = PackedLoader(torch.arange(65), seq_len=64, micro_batch_size=2, seed=0)
    assert few.batches_per_epoch == 0
    with pytest.raises(ValueError, match="fewer than one micro-batch of 2"):
        next(few)
    with pytest.raises(ValueError, match="1-D integer"):
        PackedLoader(torch.zeros(100), seq_len=4, micro_batch_size=1, seed=0)
