"""The built-in astrobiology corpus: synthetic planetary systems whose derived quantities follow physics.

Each record is one system, written as ``key: value`` lines in a fixed order: the star, then its planets
(nearest first). Quantities are either *sampled* (star mass, radius, temperature; planet mass, radius,
albedo, semi-major axis) or *derived* from fields printed before them (``DERIVED_FIELDS``): luminosity
from the Stefan-Boltzmann law, orbital period from Kepler's third law, stellar flux, equilibrium
temperature, bulk density, mass class and habitable-zone membership. Derived values are computed from
the *printed* (rounded) inputs, so a record can be checked, or a masked field scored, from its own text.

Units: star mass Msun, radius Rsun, temperature K, luminosity Lsun, habitable-zone edges AU; planet mass
and radius in Earth units, semi-major axis AU, period days, flux in Earth's insolation (S_earth),
equilibrium temperature K, density g/cm^3. The corpus is synthetic: no record describes a real system.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

SOLAR_TEFF_K = 5772.0  # IAU 2015 nominal solar effective temperature
SOLAR_RADIUS_AU = 0.00465047
YEAR_DAYS = 365.25  # Kepler's third law in years, AU and solar masses; Julian year in days
EARTH_DENSITY_GCC = 5.514
HZ_FLUX_INNER = 1.11  # conservative habitable zone, inner edge (runaway greenhouse), in S_earth
HZ_FLUX_OUTER = 0.36  # conservative habitable zone, outer edge (maximum greenhouse), in S_earth
TERRAN_MAX_EARTH = 2.04  # mass classes of Chen & Kipping (2017), in Earth masses
NEPTUNIAN_MAX_EARTH = 132.0

# Effective-temperature ranges of the spectral classes (K); subclass 0 is the hot end.
_SPECTRAL_CLASSES = (
    ("O", 30000.0, 50000.0),
    ("B", 10000.0, 30000.0),
    ("A", 7500.0, 10000.0),
    ("F", 6000.0, 7500.0),
    ("G", 5200.0, 6000.0),
    ("K", 3700.0, 5200.0),
    ("M", 2400.0, 3700.0),
    ("L", 1300.0, 2400.0),
)


def format_sig(x: float, digits: int = 3) -> str:
    """``x`` rounded to ``digits`` significant digits, in plain decimal notation (no exponent)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    exponent = math.floor(math.log10(abs(x)))
    decimals = digits - 1 - exponent
    rounded = round(x, decimals)
    if abs(rounded) >= 10.0 ** (exponent + 1):  # 9.996 -> 10.0: the rounding gained a digit
        decimals -= 1
    return f"{rounded:.{decimals}f}" if decimals > 0 else str(int(rounded))


# --- the physics -------------------------------------------------------------------------------------


def luminosity_lsun(radius_rsun: float, teff_k: float) -> float:
    """Stefan-Boltzmann: L = R^2 (T / T_sun)^4 in solar units."""
    return radius_rsun**2 * (teff_k / SOLAR_TEFF_K) ** 4


def spectral_type(teff_k: float) -> str:
    """Main-sequence spectral type (class, subclass, ``V``) from effective temperature."""
    for letter, low, high in _SPECTRAL_CLASSES:
        if teff_k >= low:
            subclass = min(9, max(0, int(10 * (high - teff_k) / (high - low))))
            return f"{letter}{subclass}V"
    return f"{_SPECTRAL_CLASSES[-1][0]}9V"


def hz_inner_au(luminosity: float) -> float:
    """Distance at which the flux equals the conservative inner edge."""
    return math.sqrt(luminosity / HZ_FLUX_INNER)


def hz_outer_au(luminosity: float) -> float:
    return math.sqrt(luminosity / HZ_FLUX_OUTER)


def orbital_period_days(a_au: float, star_mass_msun: float) -> float:
    """Kepler's third law, planet mass neglected: P[yr]^2 = a[AU]^3 / M[Msun]."""
    return YEAR_DAYS * math.sqrt(a_au**3 / star_mass_msun)


def semimajor_axis_au(period_days: float, star_mass_msun: float) -> float:
    """Kepler's third law solved for a."""
    return (star_mass_msun * (period_days / YEAR_DAYS) ** 2) ** (1.0 / 3.0)


def stellar_flux(luminosity: float, a_au: float) -> float:
    """Insolation in units of Earth's: S = L / a^2."""
    return luminosity / a_au**2


def equilibrium_temperature_k(teff_k: float, radius_rsun: float, a_au: float, albedo: float) -> float:
    """T_eq = T_star sqrt(R_star / 2a) (1 - A)^(1/4): full redistribution, Bond albedo A."""
    return teff_k * math.sqrt(radius_rsun * SOLAR_RADIUS_AU / (2.0 * a_au)) * (1.0 - albedo) ** 0.25


def bulk_density_gcc(mass_earth: float, radius_earth: float) -> float:
    return EARTH_DENSITY_GCC * mass_earth / radius_earth**3


def planet_type(mass_earth: float) -> str:
    """Mass class of Chen & Kipping (2017): terran, neptunian or jovian."""
    if mass_earth < TERRAN_MAX_EARTH:
        return "terran"
    return "neptunian" if mass_earth < NEPTUNIAN_MAX_EARTH else "jovian"


def habitable_zone(flux: float) -> str:
    """``yes`` when the insolation lies within the conservative habitable zone."""
    return "yes" if HZ_FLUX_OUTER <= flux <= HZ_FLUX_INNER else "no"


# --- the record layout -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedField:
    """A field whose value is a function of fields printed before it (in the record or its star)."""

    key: str
    inputs: tuple[str, ...]
    compute: Callable[..., float | str]
    digits: int = 3  # significant digits printed; unused for labels

    def truth(self, context: dict) -> str | None:
        """The printed value from ``context`` (field -> value), or None when an input is missing."""
        values = [context.get(name) for name in self.inputs]
        if any(not isinstance(v, (int, float)) for v in values):
            return None
        return format_value(self.compute(*values), self.digits)


STAR_KEYS = ("star_mass", "star_radius", "star_teff", "spectral_type", "luminosity", "hz_inner", "hz_outer")
PLANET_KEYS = ("planet", "mass", "type", "radius", "albedo", "a", "period", "flux", "hz", "teq", "density")
LABEL_KEYS = frozenset({"system", "planet", "spectral_type", "type", "hz"})
SAMPLED_DIGITS = {"star_mass": 3, "star_radius": 3, "star_teff": 4, "mass": 3, "radius": 3, "albedo": 2, "a": 3}

DERIVED_FIELDS: dict[str, DerivedField] = {
    f.key: f
    for f in (
        DerivedField("spectral_type", ("star_teff",), spectral_type),
        DerivedField("luminosity", ("star_radius", "star_teff"), luminosity_lsun),
        DerivedField("hz_inner", ("luminosity",), hz_inner_au),
        DerivedField("hz_outer", ("luminosity",), hz_outer_au),
        DerivedField("period", ("a", "star_mass"), orbital_period_days),
        DerivedField("flux", ("luminosity", "a"), stellar_flux),
        DerivedField("teq", ("star_teff", "star_radius", "a", "albedo"), equilibrium_temperature_k),
        DerivedField("density", ("mass", "radius"), bulk_density_gcc),
        DerivedField("type", ("mass",), planet_type),
        DerivedField("hz", ("flux",), habitable_zone),
    )
}


def format_value(value: float | str, digits: int = 3) -> str:
    return value if isinstance(value, str) else format_sig(value, digits)


def parse_value(key: str, text: str) -> float | str:
    return text if key in LABEL_KEYS else float(text)


def derive(system: dict) -> dict:
    """A copy of ``system`` with every derived field recomputed from the printed values before it."""
    return _derive_with_lines(system)[0]


def _derive_with_lines(system: dict) -> tuple[dict, list[str]]:
    """``derive`` and the record's lines in one pass (each value is formatted once: corpus speed)."""
    lines = [f"system: {system['system']}"]
    star = _derive_block(system["star"], STAR_KEYS, {}, lines)
    planets = [_derive_block(p, PLANET_KEYS, star, lines) for p in system["planets"]]
    return {"system": system["system"], "star": star, "planets": planets}, lines


def _derive_block(given: dict, keys: tuple[str, ...], outer: dict, lines: list[str]) -> dict:
    """The block's fields as printed: given ones rounded, derived ones computed from those before them."""
    block: dict = {}
    context = dict(outer)
    for key, field, digits, is_label in _layout(keys):
        if field is not None:
            try:
                value = field.compute(*[context[name] for name in field.inputs])
            except KeyError:  # an input is missing: so is this field
                continue
        elif key in given:
            value = given[key]
        else:
            continue
        text = value if is_label else format_sig(value, digits)
        block[key] = context[key] = text if is_label else float(text)
        lines.append(f"{key}: {text}")
    return block


@functools.cache
def _layout(keys: tuple[str, ...]) -> tuple[tuple[str, DerivedField | None, int, bool], ...]:
    """Per key: its derivation (or None), printed digits, and whether it is a label (corpus speed)."""
    return tuple((key, DERIVED_FIELDS.get(key), _digits(key), key in LABEL_KEYS) for key in keys)


def format_record(system: dict) -> str:
    """The record text: ``key: value`` lines, star then planets, in the fixed field order."""
    lines = [f"system: {system['system']}"]
    for block, keys in [(system["star"], STAR_KEYS)] + [(p, PLANET_KEYS) for p in system["planets"]]:
        lines += [f"{key}: {format_value(block[key], _digits(key))}" for key in keys if key in block]
    return "\n".join(lines)


def _digits(key: str) -> int:
    field = DERIVED_FIELDS.get(key)
    return field.digits if field is not None else SAMPLED_DIGITS.get(key, 3)


def parse_record(text: str) -> dict:
    """Inverse of ``format_record``: a ``planet:`` line opens a planet block; unknown keys are refused."""
    system: dict = {"system": None, "star": {}, "planets": []}
    for number, line in enumerate(text.splitlines(), start=1):
        key, sep, value = line.partition(": ")
        if not sep:
            raise ValueError(f"line {number} of the record is not 'key: value': {line!r}")
        if key == "system":
            system["system"] = value
        elif key == "planet":
            system["planets"].append({"planet": value})
        elif key in PLANET_KEYS and system["planets"]:
            system["planets"][-1][key] = parse_value(key, value)
        elif key in STAR_KEYS:
            system["star"][key] = parse_value(key, value)
        else:
            raise ValueError(f"line {number} of the record has an unexpected key {key!r}")
    return system


def field_completions(record: str, key: str) -> list[tuple[str, str]]:
    """For each ``key: value`` line: (the record up to and including ``key: ``, the value).

    The prompt/answer pairs of a probe that asks a model to complete one field from what precedes it.
    """
    pairs = []
    start = 0
    for line in record.splitlines(keepends=True):
        if line.startswith(f"{key}: "):
            prompt_end = start + len(key) + 2
            pairs.append((record[:prompt_end], line[len(key) + 2 :].rstrip("\n")))
        start += len(line)
    return pairs


# --- sampling ----------------------------------------------------------------------------------------


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _sample_star(rng: random.Random) -> dict:
    """A main-sequence star: mass-radius and mass-luminosity relations with scatter."""
    mass = _log_uniform(rng, 0.1, 1.6)
    radius = (mass**0.8 if mass < 1.0 else mass**0.57) * rng.lognormvariate(0.0, 0.05)
    main_sequence_luminosity = mass**4 if mass > 0.43 else 0.23 * mass**2.3
    teff = SOLAR_TEFF_K * (main_sequence_luminosity / radius**2) ** 0.25 * (1.0 + rng.gauss(0.0, 0.02))
    return {"star_mass": mass, "star_radius": radius, "star_teff": teff}


def _planet_radius_earth(rng: random.Random, mass_earth: float) -> float:
    """Chen & Kipping (2017) power laws, continuous at the class boundaries, with their scatter."""
    terran_edge = 1.008 * TERRAN_MAX_EARTH**0.279
    neptunian_edge = terran_edge * (NEPTUNIAN_MAX_EARTH / TERRAN_MAX_EARTH) ** 0.589
    if mass_earth < TERRAN_MAX_EARTH:
        radius, scatter = 1.008 * mass_earth**0.279, 0.04
    elif mass_earth < NEPTUNIAN_MAX_EARTH:
        radius, scatter = terran_edge * (mass_earth / TERRAN_MAX_EARTH) ** 0.589, 0.15
    else:
        radius, scatter = neptunian_edge * (mass_earth / NEPTUNIAN_MAX_EARTH) ** -0.044, 0.07
    return radius * rng.lognormvariate(0.0, scatter)


def _sample_planet(rng: random.Random, luminosity: float) -> dict:
    mass = _log_uniform(rng, 0.1, 3000.0)
    # half the planets near the habitable zone so that both answers of the ``hz`` field are common
    flux = _log_uniform(rng, 0.2, 2.5) if rng.random() < 0.5 else _log_uniform(rng, 0.01, 100.0)
    return {
        "mass": mass,
        "radius": _planet_radius_earth(rng, mass),
        "albedo": rng.uniform(0.05, 0.7),
        "a": math.sqrt(luminosity / flux),
    }


def generate_system(rng: random.Random) -> dict:
    """One synthetic system (a dict of star and planet fields, derived ones included) from ``rng``."""
    return _derive_with_lines(_sample_system(rng))[0]


def _sample_system(rng: random.Random) -> dict:
    """The sampled quantities of one system, unrounded; ``derive`` rounds them and adds the rest."""
    star = _sample_star(rng)
    luminosity = luminosity_lsun(star["star_radius"], star["star_teff"])
    count = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    planets = sorted((_sample_planet(rng, luminosity) for _ in range(count)), key=lambda p: p["a"])
    for letter, planet in zip("bcd", planets):
        planet["planet"] = letter
    return {"system": f"SYN-{rng.randrange(10000):04d}", "star": star, "planets": planets}


def builtin_records(count: int = 20000, seed: int = 0) -> list[str]:
    """``count`` records generated from ``seed``: the same arguments give the same records."""
    if count < 1:
        raise ValueError(f"the built-in corpus needs at least 1 record, got {count}")
    rng = random.Random(seed)
    return ["\n".join(_derive_with_lines(_sample_system(rng))[1]) for _ in range(count)]
