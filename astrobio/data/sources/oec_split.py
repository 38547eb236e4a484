"""The ``oec://`` data source: one side of an Open Exoplanet Catalogue file split by system, so that a
model trained on ``split=train`` is evaluated on systems it never saw (docs/EVALUATION.md). Registered
when astrobio.data.sources is imported, as the http(s) sources are."""

from __future__ import annotations

from pathlib import Path

from astrobio.data import corpus
from astrobio.data.oec import DEFAULT_HELD_OUT, SPLITS, Body, parse_oec, split_systems, system_record
from astrobio.data.sources.registry import FileSource, Source, SourceError, SourceOptions, register_scheme


class SplitCatalogueSource(Source):
    """``oec://PATH?split=train|heldout[&heldout=FRACTION][&synthetic=N]``: one side of a catalogue file
    split by system (``PATH`` relative, or absolute: ``oec:///abs/file.xml.gz``, or ``oec:/abs/...`` as
    config.json stores it). ``records`` are the side's systems as text records, followed by ``N`` records
    of the built-in synthetic corpus drawn from the seed (none by default): real systems to learn the
    catalogue's records from, synthetic ones whose ``hz`` answers are common enough (28%, against the
    catalogue's 3%) to learn the rule from. ``rows`` are the side's planets' catalogue rows."""

    format = "oec"
    PARAMETERS = ("split", "heldout", "synthetic")

    def __init__(self, uri: str, options: SourceOptions | None = None, **_):
        # NOTE: oec:///abs/path is stored as oec:/abs/path (urlunsplit, in redact_uri, drops an empty host)
        path, _, query = uri.removeprefix("oec:").removeprefix("//").partition("?")
        params = dict(part.partition("=")[::2] for part in query.split("&") if part)
        unknown = sorted(set(params) - set(self.PARAMETERS))
        if unknown or params.get("split") not in SPLITS or not path:
            raise SourceError(f"{uri}: write oec://PATH?split=train or oec://PATH?split=heldout (optionally "
                              f"&heldout=FRACTION, default {DEFAULT_HELD_OUT}, and &synthetic=N) with PATH an "
                              f"Open Exoplanet Catalogue .xml or .xml.gz file")
        self.split = params["split"]
        try:
            self.fraction = float(params.get("heldout", DEFAULT_HELD_OUT))
        except ValueError:
            self.fraction = -1.0
        if not 0.0 < self.fraction < 1.0:
            raise SourceError(f"{uri}: heldout={params['heldout']} must be a fraction of the systems in (0, 1)")
        synthetic = params.get("synthetic", "0")
        if not synthetic.isdigit():
            raise SourceError(f"{uri}: synthetic={synthetic} must be a whole number of built-in records (>= 0)")
        self.synthetic = int(synthetic)
        self.path = Path(path)
        self.name = uri

    def __repr__(self) -> str:
        return f"SplitCatalogueSource({self.name!r})"

    def uri_of(self, split: str) -> str:
        """The URI of one side of the same split, without synthetic records."""
        return f"oec://{self.path}?split={split}&heldout={self.fraction}"

    def fetch(self) -> bytes:
        return FileSource(self.path, "oec").fetch()

    def systems(self) -> list[Body]:
        train, held_out = split_systems(parse_oec(self.fetch(), str(self.path)), self.fraction)
        return held_out if self.split == "heldout" else train

    def records(self, seed: int = 0) -> list[str]:
        real = [system_record(system) for system in self.systems()]
        return real + (corpus.builtin_records(self.synthetic, seed) if self.synthetic else [])

    def rows(self) -> list[dict]:
        from astrobio.data.catalogue import oec_planet_rows
        return oec_planet_rows(b"", self.systems())


register_scheme("oec", SplitCatalogueSource)
