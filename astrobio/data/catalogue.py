"""Catalogue records as numeric feature vectors with missing-value masks, for the catalogue encoder.

A *planet row* is a dict of canonical keys (``FEATURES``; planet mass and radius in Earth units, like
the built-in corpus) holding floats or None. Rows come from the Open Exoplanet Catalogue
(:func:`oec_planet_rows`, over ``astrobio.data.oec``'s parsed systems), from the built-in synthetic
corpus (:func:`builtin_planet_rows`), or from any table whose columns use the canonical keys or the NASA
Exoplanet Archive's column names (``pl_bmasse``, ``st_teff``, ...; see ``ALIASES``).

:func:`catalogue_features` maps rows to ``values [n, F]`` and ``mask [n, F]``: each present value is
transformed (log10 where the quantity is a positive physical scale, linear otherwise), centred and
scaled by fixed constants (so that features mean the same thing in every run and on every data set),
and clipped to +-``CLIP``; a missing, non-numeric, non-finite or (for a log feature) non-positive value
has mask False and value 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from astrobio.data.oec import JUPITER_MASS_EARTH, JUPITER_RADIUS_EARTH, Body, parse_oec

CLIP = 8.0


@dataclass(frozen=True)
class Feature:
    key: str
    unit: str
    log: bool       # log10 of the value before centring
    center: float   # in the transformed space
    scale: float


# Centres and scales: the middle and spread of known exoplanets and their hosts (in log10 where log).
FEATURES: tuple[Feature, ...] = (
    Feature("planet_mass", "M_earth", True, 1.5, 1.2),
    Feature("planet_radius", "R_earth", True, 0.6, 0.4),
    Feature("period", "day", True, 1.3, 1.2),
    Feature("semimajor_axis", "AU", True, -1.0, 0.8),
    Feature("eccentricity", "", False, 0.1, 0.2),
    Feature("planet_temperature", "K", True, 2.9, 0.3),
    Feature("star_mass", "M_sun", True, 0.0, 0.3),
    Feature("star_radius", "R_sun", True, 0.0, 0.4),
    Feature("star_temperature", "K", True, 3.74, 0.1),
    Feature("star_metallicity", "dex", False, 0.0, 0.3),
    Feature("distance", "pc", True, 2.3, 0.8),
)
FEATURE_KEYS = tuple(f.key for f in FEATURES)
NUM_FEATURES = len(FEATURES)

# Other column names of a feature, with the factor to its unit (NASA Exoplanet Archive columns).
ALIASES: dict[str, tuple[tuple[str, float], ...]] = {
    "planet_mass": (("pl_bmasse", 1.0), ("pl_bmassj", JUPITER_MASS_EARTH)),
    "planet_radius": (("pl_rade", 1.0), ("pl_radj", JUPITER_RADIUS_EARTH)),
    "period": (("pl_orbper", 1.0),),
    "semimajor_axis": (("pl_orbsmax", 1.0),),
    "eccentricity": (("pl_orbeccen", 1.0),),
    "planet_temperature": (("pl_eqt", 1.0),),
    "star_mass": (("st_mass", 1.0),),
    "star_radius": (("st_rad", 1.0),),
    "star_temperature": (("st_teff", 1.0),),
    "star_metallicity": (("st_met", 1.0),),
    "distance": (("sy_dist", 1.0),),
}


def as_number(value) -> float | None:
    """A finite float from a number or numeric string; None for anything else (empty, text, nan)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def lookup(row: Mapping, key: str) -> float | None:
    """The feature ``key`` of a row in its canonical unit, from the canonical column or an alias."""
    value = as_number(row.get(key))
    if value is not None:
        return value
    for alias, factor in ALIASES.get(key, ()):
        value = as_number(row.get(alias))
        if value is not None:
            return value * factor
    return None


def normalise(feature: Feature, value: float | None) -> float | None:
    if value is None or (feature.log and value <= 0):
        return None
    x = math.log10(value) if feature.log else value
    return max(-CLIP, min(CLIP, (x - feature.center) / feature.scale))


def feature_vector(row: Mapping | None) -> tuple[list[float], list[bool]]:
    """(values, mask) of one row; None (no catalogue record) gives all-missing."""
    values, mask = [], []
    for feature in FEATURES:
        x = normalise(feature, lookup(row, feature.key)) if row is not None else None
        values.append(0.0 if x is None else x)
        mask.append(x is not None)
    return values, mask


def catalogue_features(rows: Iterable[Mapping | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` float32 ``[n, NUM_FEATURES]`` and ``mask`` bool ``[n, NUM_FEATURES]``."""
    pairs = [feature_vector(row) for row in rows]
    values = torch.tensor([v for v, _ in pairs], dtype=torch.float32).reshape(-1, NUM_FEATURES)
    mask = torch.tensor([m for _, m in pairs], dtype=torch.bool).reshape(-1, NUM_FEATURES)
    return values, mask


def denormalise(key: str, x: float) -> float:
    """Inverse of the normalisation of one (unclipped) feature value: back to its unit."""
    feature = FEATURES[FEATURE_KEYS.index(key)]
    y = x * feature.scale + feature.center
    return 10.0 ** y if feature.log else y


# --- rows from the Open Exoplanet Catalogue ----------------------------------------------------------


def oec_planet_rows(data: bytes, systems: list[Body] | None = None) -> list[dict]:
    """One row per planet of a catalogue file's bytes (or of already parsed ``systems``). Star features
    come from the planet's own star; planets around a binary or without a star have none. A quantity
    known only as a limit is missing; a minimum mass (msini) counts as the mass."""
    rows = []
    for system, planet, star in oec_planets(systems if systems is not None else parse_oec(data)):
        rows.append(oec_row(system, planet, star))
    return rows


def oec_planets(systems: list[Body]) -> list[tuple[Body, Body, Body | None]]:
    """(system, planet, host star or None) for every planet, in catalogue order."""
    found = []

    def visit(body: Body, system: Body, parent: Body) -> None:
        if body.kind == "planet":
            found.append((system, body, parent if parent.kind == "star" else None))
        for child in body.children:
            visit(child, system, body)

    for system in systems:
        visit(system, system, system)
    return found


def oec_row(system: Body, planet: Body, star: Body | None) -> dict:
    def value(body: Body | None, tag: str, factor: float = 1.0) -> float | None:
        quantity = body.quantities.get(tag) if body is not None else None
        return None if quantity is None or quantity.value is None else quantity.value * factor

    return {
        "name": planet.name,
        "planet_mass": value(planet, "mass", JUPITER_MASS_EARTH),
        "planet_radius": value(planet, "radius", JUPITER_RADIUS_EARTH),
        "period": value(planet, "period"),
        "semimajor_axis": value(planet, "semimajoraxis"),
        "eccentricity": value(planet, "eccentricity"),
        "planet_temperature": value(planet, "temperature"),
        "star_mass": value(star, "mass"),
        "star_radius": value(star, "radius"),
        "star_temperature": value(star, "temperature"),
        "star_metallicity": value(star, "metallicity"),
        "distance": value(system, "distance"),
    }


# --- rows from the built-in synthetic corpus ---------------------------------------------------------


def synthetic_row(system: dict, planet: dict) -> dict:
    """A row of one planet of ``astrobio.data.corpus.generate_system``'s dict (no eccentricity,
    metallicity or distance there: those stay missing)."""
    star = system["star"]
    return {
        "name": f"{system['system']} {planet['planet']}",
        "planet_mass": planet.get("mass"),
        "planet_radius": planet.get("radius"),
        "period": planet.get("period"),
        "semimajor_axis": planet.get("a"),
        "planet_temperature": planet.get("teq"),
        "star_mass": star.get("star_mass"),
        "star_radius": star.get("star_radius"),
        "star_temperature": star.get("star_teff"),
    }


def builtin_planet_rows(count: int = 1000, seed: int = 0) -> list[dict]:
    """Rows of the planets of ``count`` synthetic systems drawn from ``seed``."""
    from astrobio.data.corpus import generate_system

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        system = generate_system(rng)
        rows += [synthetic_row(system, planet) for planet in system["planets"]]
    return rows
