"""Reader for the Open Exoplanet Catalogue's XML (``systems.xml.gz``, or one ``<system>`` file).

``read_oec`` parses the catalogue into ``Body`` trees (system > binary/star > planet, binaries nested
to any depth) keeping values with their ``errorminus``/``errorplus`` and ``lowerlimit``/``upperlimit``;
``oec_records`` turns each system into one text record in the style of the built-in corpus
(``astrobio.data.corpus``): the same keys and units (planet mass and radius converted from Jupiter to
Earth units), values rounded to 3 significant digits, derived fields computed from the printed values
where their inputs exist and omitted where they do not. A planet around a binary (P-type) uses the
summed mass and luminosity of the binary's stars. A quantity known only as a limit prints as ``<x``,
``>x`` or ``x..y`` and feeds no derivation; a minimum mass (``type="msini"``) prints as ``msini``.

The file is data: DOCTYPE and entity declarations are refused before parsing (the stdlib parser never
fetches external entities, and with no DOCTYPE there are no internal entities to expand).

``oec://PATH?split=train`` (or ``split=heldout``) is a data source of one side of a split by system:
a system's side is decided by a hash of its name (``is_held_out``), so the held-out systems never
appear in training, whatever the seed, the catalogue's order or the other systems in the file.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from astrobio.data import corpus
from astrobio.data.corpus import DERIVED_FIELDS, format_sig
from astrobio.data.text import gunzip_if_compressed

JUPITER_MASS_EARTH = 317.83
JUPITER_RADIUS_EARTH = 11.209

_BODY_TAGS = ("system", "binary", "star", "planet")
_NUMERIC_TAGS = frozenset(
    {"mass", "radius", "temperature", "period", "semimajoraxis", "eccentricity", "distance", "metallicity", "age"}
)
_LABEL_TAGS = frozenset({"spectraltype", "discoverymethod", "discoveryyear", "list"})
_UNSAFE = re.compile(rb"<!DOCTYPE|<!ENTITY", re.IGNORECASE)


@dataclass(frozen=True)
class Quantity:
    """A catalogue value: ``value`` None when only limits (or nothing) are given."""

    value: float | None
    errorminus: float | None = None
    errorplus: float | None = None
    lowerlimit: float | None = None
    upperlimit: float | None = None
    type: str | None = None  # "msini" for a minimum mass

    def text(self, scale: float = 1.0, digits: int = 3) -> str | None:
        """The printed form: the value, else its limits, else None."""
        if self.value is not None:
            return format_sig(self.value * scale, digits)
        low, high = self.lowerlimit, self.upperlimit
        if low is not None and high is not None:
            return f"{format_sig(low * scale, digits)}..{format_sig(high * scale, digits)}"
        if high is not None:
            return f"<{format_sig(high * scale, digits)}"
        if low is not None:
            return f">{format_sig(low * scale, digits)}"
        return None


@dataclass
class Body:
    """A system, binary, star or planet: its first name, quantities, text labels and nested bodies."""

    kind: str
    name: str | None = None
    quantities: dict[str, Quantity] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    children: list[Body] = field(default_factory=list)

    def walk(self, kind: str) -> Iterator[Body]:
        """Every nested body of ``kind`` (this one included), depth first."""
        if self.kind == kind:
            yield self
        for child in self.children:
            yield from child.walk(kind)


# --- parsing -----------------------------------------------------------------------------------------


def read_oec(path: str | Path) -> list[Body]:
    """The systems of a catalogue file (plain or gzip-compressed XML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Open Exoplanet Catalogue file {path} does not exist")
    return parse_oec(path.read_bytes(), source=str(path))


def parse_oec(data: bytes, source: str = "<bytes>") -> list[Body]:
    """The systems in ``data`` (XML, or gzip of it); ``source`` names it in errors."""
    data = gunzip_if_compressed(data, source)
    if not data.strip():
        raise ValueError(f"{source} is empty; expected the Open Exoplanet Catalogue's XML")
    if _UNSAFE.search(data):
        raise ValueError(f"{source}: DOCTYPE and ENTITY declarations are refused in catalogue XML")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise ValueError(f"{source} is not well-formed XML: {err}") from None
    if root.tag == "system":
        elements = [root]
    elif root.tag == "systems":
        elements = root.findall("system")
    else:
        raise ValueError(
            f"{source}: root element <{root.tag}>, expected <systems> or <system> (Open Exoplanet Catalogue format)"
        )
    if not elements:
        raise ValueError(f"{source} holds no <system> element")
    return [_parse_body(element, source) for element in elements]


def _parse_body(element: ET.Element, source: str) -> Body:
    body = Body(kind=element.tag)
    for child in element:
        text = (child.text or "").strip()
        if child.tag in _BODY_TAGS:
            body.children.append(_parse_body(child, source))
        elif child.tag == "name":
            body.name = body.name or text
        elif child.tag == "separation":
            if child.get("unit", "AU") == "AU":  # angular separations (arcsec) need the distance: skipped
                body.quantities["separation"] = _parse_quantity(child, body, source)
        elif child.tag in _NUMERIC_TAGS:
            body.quantities[child.tag] = _parse_quantity(child, body, source)
        elif child.tag in _LABEL_TAGS and text:
            body.labels[child.tag] = text
    return body


def _parse_quantity(element: ET.Element, body: Body, source: str) -> Quantity:
    def number(text: str | None, what: str) -> float | None:
        if text is None or not text.strip():
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"{source}: <{element.tag}> {what} of {body.kind} {body.name!r} is {text!r}, not a number"
            ) from None

    return Quantity(
        value=number(element.text, "value"),
        errorminus=number(element.get("errorminus"), "errorminus"),
        errorplus=number(element.get("errorplus"), "errorplus"),
        lowerlimit=number(element.get("lowerlimit"), "lowerlimit"),
        upperlimit=number(element.get("upperlimit"), "upperlimit"),
        type=element.get("type"),
    )


# --- records -----------------------------------------------------------------------------------------


def oec_records(path: str | Path) -> list[str]:
    """One text record per system of the catalogue file."""
    return [system_record(system) for system in read_oec(path)]


def system_record(system: Body) -> str:
    """The record of one system: its lines, then each star, binary and planet depth first."""
    lines = [f"system: {system.name or 'unnamed'}"]
    _add(lines, {}, "distance", system.quantities.get("distance"))
    for child in system.children:
        _body_lines(child, system, lines)
    return "\n".join(lines)


def _body_lines(body: Body, parent: Body, lines: list[str]) -> dict:
    """Append ``body``'s lines; returns its printed numeric fields (the context of its planets)."""
    if body.kind == "star":
        return _star_lines(body, lines)
    if body.kind == "planet":
        _planet_lines(body, parent, lines)
        return {}
    lines.append(f"binary: {body.name or 'unnamed'}")
    _add(lines, {}, "separation", body.quantities.get("separation"))
    members = [_body_lines(child, body, lines) for child in body.children if child.kind != "planet"]
    host = _combined_host(members)
    for planet in (child for child in body.children if child.kind == "planet"):
        _planet_lines(planet, body, lines, host)
    return host


def _star_lines(star: Body, lines: list[str]) -> dict:
    lines.append(f"star: {star.name or 'unnamed'}")
    context: dict = {}
    q = star.quantities
    _add(lines, context, "star_mass", q.get("mass"))
    _add(lines, context, "star_radius", q.get("radius"))
    _add(lines, context, "star_teff", q.get("temperature"))
    given_type = star.labels.get("spectraltype")
    if given_type:
        lines.append(f"spectral_type: {given_type}")
    else:
        _derive(lines, context, "spectral_type")
    for key in ("luminosity", "hz_inner", "hz_outer"):
        _derive(lines, context, key)
    _add(lines, {}, "metallicity", q.get("metallicity"))
    _add(lines, {}, "age", q.get("age"))
    for planet in (child for child in star.children if child.kind == "planet"):
        _planet_lines(planet, star, lines, context)
    return context


def _combined_host(members: list[dict]) -> dict:
    """Total mass and luminosity of a binary's members, each only when every member has it."""
    host = {}
    for key in ("star_mass", "luminosity"):
        values = [m.get(key) for m in members]
        if values and all(isinstance(v, float) for v in values):
            host[key] = sum(values)
    return host


def _planet_lines(planet: Body, parent: Body, lines: list[str], host: dict | None = None) -> None:
    """A planet; its host context is its star's printed fields, or the binary's sums, or none (orphans)."""
    lines.append(f"planet: {_short_name(planet.name, parent.name)}")
    if parent.kind != "star":
        lines.append(f"host: {parent.name or 'unnamed'}" if parent.kind == "binary" else "host: none")
    context = dict(host or {})
    q = planet.quantities
    mass = q.get("mass")
    _add(lines, context, "msini" if mass is not None and mass.type == "msini" else "mass", mass, JUPITER_MASS_EARTH)
    _derive(lines, context, "type")
    _add(lines, context, "radius", q.get("radius"), JUPITER_RADIUS_EARTH)
    _orbit_lines(lines, context, q.get("semimajoraxis"), q.get("period"))
    _add(lines, {}, "eccentricity", q.get("eccentricity"))
    _derive(lines, context, "flux")
    _derive(lines, context, "hz")
    _add(lines, context, "teq", q.get("temperature"))
    _derive(lines, context, "density")
    for key, label in (("discoverymethod", "discovery_method"), ("discoveryyear", "discovery_year"), ("list", "list")):
        if key in planet.labels:
            lines.append(f"{label}: {planet.labels[key]}")


_A_FROM_PERIOD = corpus.DerivedField("a", ("period", "star_mass"), corpus.semimajor_axis_au)


def _orbit_lines(lines: list[str], context: dict, a: Quantity | None, period: Quantity | None) -> None:
    """``a`` then ``period``, each as given or, when only the other is known, from Kepler's third law."""
    if _has_value(a) or not _has_value(period):
        _add(lines, context, "a", a)
    elif not _derive(lines, context, "a", _A_FROM_PERIOD, {"period": float(period.text())}):
        _add(lines, context, "a", a)
    if _has_value(period) or not _derive(lines, context, "period"):
        _add(lines, context, "period", period)


def _has_value(quantity: Quantity | None) -> bool:
    return quantity is not None and quantity.value is not None


def _short_name(name: str | None, parent_name: str | None) -> str:
    """``b`` for planet ``Kepler-11 b`` of star ``Kepler-11``: the style of the built-in corpus."""
    if not name:
        return "unnamed"
    if parent_name and name.startswith(parent_name + " ") and len(name) > len(parent_name) + 1:
        return name[len(parent_name) + 1 :]
    return name


def _add(lines: list[str], context: dict, key: str, quantity: Quantity | None, scale: float = 1.0) -> None:
    """Print a catalogue quantity; a value (not a limit) also enters ``context`` for derivations."""
    if quantity is None:
        return
    text = quantity.text(scale, corpus.SAMPLED_DIGITS.get(key, 3))
    if text is None:
        return
    lines.append(f"{key}: {text}")
    if quantity.value is not None:
        context[key] = float(text)


def _derive(
    lines: list[str], context: dict, key: str, derived: corpus.DerivedField | None = None, extra: dict | None = None
) -> bool:
    """Print a derived field when its inputs are in ``context`` (plus ``extra``, not printed yet)."""
    derived = derived or DERIVED_FIELDS[key]
    text = derived.truth({**context, **extra} if extra else context)
    if text is None:
        return False
    lines.append(f"{key}: {text}")
    context[key] = corpus.parse_value(key, text)
    return True


# --- a split by system -------------------------------------------------------------------------------

SPLITS = ("train", "heldout")
DEFAULT_HELD_OUT = 0.2  # of the real catalogue's 4,081 systems: ~816 held out, ~30 'hz: yes' planets among them


def is_held_out(system_name: str, fraction: float) -> bool:
    """Whether the system of this name is held out: the first 8 bytes of the SHA-256 of its name, read
    as a number in [0, 1), fall below ``fraction``."""
    digest = hashlib.sha256(system_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_systems(systems: list[Body], fraction: float) -> tuple[list[Body], list[Body]]:
    """(train, held-out) systems, each in catalogue order."""
    held = [is_held_out(system.name or "", fraction) for system in systems]
    return [s for s, h in zip(systems, held) if not h], [s for s, h in zip(systems, held) if h]
