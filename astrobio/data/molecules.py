"""Molecules as graphs: a built-in table of biosignature and atmospheric molecules, a SMILES parser, and
the conversion to ``torch_geometric.data.Data`` (atoms as nodes, bonds as edges).

The parser reads the SMILES most molecule tables use: the organic subset (B C N O P S F Cl Br I and
aromatic b c n o p s) with implicit hydrogens, bracket atoms (``[nH]``, ``[O-]``, ``[13CH4]``, ``[C@@H]``:
isotope and chirality are read and dropped), bonds ``- = # $ :`` (and ``/ \\``, read as single), branches,
ring closures (``1``, ``%12``) and ``.`` between disconnected parts. Hydrogens are a count on their
heavy atom, not nodes, unless written as atoms (``[H][H]``).

Implicit hydrogens (OpenSMILES): an organic-subset atom takes the smallest of its normal valences that
covers its bonds (aromatic bonds count 1, plus 1 for the aromatic atom's share of the ring) and fills the
rest with hydrogens; aromatic ``o`` and ``s`` take none (they give the ring a lone pair).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

AROMATIC = 1.5
BOND_ORDERS = {"-": 1.0, "=": 2.0, "#": 3.0, "$": 4.0, ":": AROMATIC, "/": 1.0, "\\": 1.0}
NORMAL_VALENCES = {"B": (3,), "C": (4,), "N": (3, 5), "O": (2,), "P": (3, 5), "S": (2, 4, 6),
                   "F": (1,), "Cl": (1,), "Br": (1,), "I": (1,)}
ORGANIC_AROMATIC = {"b": "B", "c": "C", "n": "N", "o": "O", "p": "P", "s": "S"}
BRACKET_AROMATIC = {**ORGANIC_AROMATIC, "se": "Se", "as": "As"}
ELEMENTS = frozenset(
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
    "Rb Sr Y Zr Nb Mo Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba W Pt Au Hg Tl Pb Bi U".split())

# Node features: element one-hot (the vocabulary + "other"), hydrogen count one-hot 0..4, heavy-atom
# degree one-hot 0..4, formal charge, aromatic flag. Edge features: bond order one-hot.
ELEMENT_VOCAB = ("H", "B", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I")
EDGE_ORDERS = (1.0, 2.0, 3.0, 4.0, AROMATIC)
NODE_FEATURES = len(ELEMENT_VOCAB) + 1 + 5 + 5 + 2
EDGE_FEATURES = len(EDGE_ORDERS)


class SMILESError(ValueError):
    """A SMILES string the parser cannot read; the message gives the position and the string."""


@dataclass
class Atom:
    element: str
    charge: int = 0
    hydrogens: int = 0
    aromatic: bool = False
    bracket: bool = False


@dataclass
class Molecule:
    smiles: str
    atoms: list[Atom] = field(default_factory=list)
    bonds: list[tuple[int, int, float]] = field(default_factory=list)  # (i, j, order), i < j

    def formula(self) -> str:
        """Hill notation (C, then H, then the rest alphabetically; alphabetical without carbon)."""
        counts = Counter(a.element for a in self.atoms)
        counts["H"] += sum(a.hydrogens for a in self.atoms)
        order = ["C", "H"] if counts["C"] else []
        order += sorted(e for e in counts if e not in order and counts[e])
        return "".join(e + (str(counts[e]) if counts[e] > 1 else "") for e in order if counts[e])


@dataclass(frozen=True)
class MoleculeInfo:
    name: str
    smiles: str
    formula: str  # Hill notation, written by hand from chemistry references (the parser's test reference)
    role: str


# Biosignature and atmospheric molecules. "role" is one line on why the molecule matters.
MOLECULES: dict[str, MoleculeInfo] = {m.name: m for m in (
    MoleculeInfo("H2O", "O", "H2O", "water; habitability, all atmospheres"),
    MoleculeInfo("CO2", "O=C=O", "CO2", "greenhouse gas; rocky-planet atmospheres"),
    MoleculeInfo("CH4", "C", "CH4", "biosignature with O2 (disequilibrium); giant planets"),
    MoleculeInfo("O2", "O=O", "O2", "biosignature (oxygenic photosynthesis)"),
    MoleculeInfo("O3", "[O-][O+]=O", "O3", "photochemical proxy of O2"),
    MoleculeInfo("N2O", "[N-]=[N+]=O", "N2O", "biosignature (denitrification)"),
    MoleculeInfo("NH3", "N", "H3N", "biosignature candidate; cool giants"),
    MoleculeInfo("PH3", "P", "H3P", "biosignature candidate (anaerobic life)"),
    MoleculeInfo("CH3Cl", "CCl", "CH3Cl", "biosignature candidate (chloromethane)"),
    MoleculeInfo("CH3Br", "CBr", "CH3Br", "biosignature candidate (bromomethane)"),
    MoleculeInfo("DMS", "CSC", "C2H6S", "biosignature candidate (dimethyl sulfide, marine life)"),
    MoleculeInfo("DMDS", "CSSC", "C2H6S2", "biosignature candidate (dimethyl disulfide)"),
    MoleculeInfo("H2S", "S", "H2S", "volcanic and anoxic atmospheres"),
    MoleculeInfo("SO2", "O=S=O", "O2S", "volcanism; photochemistry"),
    MoleculeInfo("CO", "[C-]#[O+]", "CO", "anti-biosignature; hot giants"),
    MoleculeInfo("HCN", "C#N", "CHN", "prebiotic chemistry"),
    MoleculeInfo("OCS", "O=C=S", "COS", "volcanic sulfur"),
    MoleculeInfo("N2", "N#N", "N2", "background gas of rocky planets"),
    MoleculeInfo("H2", "[H][H]", "H2", "primary atmospheres; giant planets"),
    MoleculeInfo("C2H2", "C#C", "C2H2", "photochemistry of hydrocarbon hazes"),
    MoleculeInfo("C2H6", "CC", "C2H6", "photochemistry of methane"),
    MoleculeInfo("isoprene", "CC(=C)C=C", "C5H8", "biosignature candidate (plant emission)"),
    MoleculeInfo("CH3OH", "CO", "CH4O", "methanol; comets and biology"),
    MoleculeInfo("H2CO", "C=O", "CH2O", "formaldehyde; prebiotic chemistry"),
    MoleculeInfo("glycine", "NCC(=O)O", "C2H5NO2", "simplest amino acid"),
    MoleculeInfo("adenine", "Nc1ncnc2[nH]cnc12", "C5H5N5", "nucleobase; prebiotic chemistry"),
    MoleculeInfo("benzene", "c1ccccc1", "C6H6", "aromatic hydrocarbon; haze chemistry"),
)}


def smiles_of(name_or_smiles: str) -> str:
    """The table's SMILES for a molecule name (case-insensitive), else the argument as SMILES."""
    for name, info in MOLECULES.items():
        if name.lower() == name_or_smiles.lower():
            return info.smiles
    return name_or_smiles


class _Parser:
    def __init__(self, smiles: str):
        self.s = smiles
        self.i = 0
        self.mol = Molecule(smiles)
        self.prev: int | None = None
        self.branches: list[int] = []
        self.bond: str | None = None
        self.rings: dict[int, tuple[int, str | None]] = {}

    def fail(self, what: str) -> SMILESError:
        return SMILESError(f"{what} at position {self.i} of SMILES {self.s!r}")

    def parse(self) -> Molecule:
        if not self.s:
            raise SMILESError("empty SMILES string; give at least one atom")
        while self.i < len(self.s):
            self.step(self.s[self.i])
        if self.branches:
            raise self.fail("unclosed branch '('")
        if self.rings:
            raise self.fail(f"unclosed ring bond {min(self.rings)}")
        if self.bond is not None:
            raise self.fail(f"bond {self.bond!r} with no atom after it")
        add_implicit_hydrogens(self.mol)
        return self.mol

    def step(self, c: str) -> None:
        if c == "(":
            if self.prev is None or self.bond is not None:
                raise self.fail("branch '(' without an atom before it")
            self.branches.append(self.prev)
            self.i += 1
        elif c == ")":
            if not self.branches or self.bond is not None:
                raise self.fail("unmatched ')' or a bond before it")
            self.prev = self.branches.pop()
            self.i += 1
        elif c in BOND_ORDERS:
            if self.bond is not None:
                raise self.fail(f"two bonds in a row ({self.bond!r} then {c!r})")
            if self.prev is None:
                raise self.fail(f"bond {c!r} without an atom before it")
            self.bond = c
            self.i += 1
        elif c == ".":
            if self.bond is not None or self.prev is None:
                raise self.fail("'.' without an atom before it")
            self.prev = None
            self.i += 1
        elif c.isdigit() or c == "%":
            self.ring_closure()
        elif c == "[":
            self.add_atom(self.bracket_atom())
        else:
            self.add_atom(self.organic_atom())

    def ring_closure(self) -> None:
        if self.prev is None:
            raise self.fail("ring bond number without an atom before it")
        if self.s[self.i] == "%":
            digits = self.s[self.i + 1:self.i + 3]
            if len(digits) != 2 or not digits.isdigit():
                raise self.fail("'%' must be followed by two digits")
            number, self.i = int(digits), self.i + 3
        else:
            number, self.i = int(self.s[self.i]), self.i + 1
        if number not in self.rings:
            self.rings[number] = (self.prev, self.bond)
        else:
            other, first = self.rings.pop(number)
            if other == self.prev:
                raise self.fail(f"ring bond {number} closes on its own atom")
            if first and self.bond and BOND_ORDERS[first] != BOND_ORDERS[self.bond]:
                raise self.fail(f"ring bond {number} written as {first!r} and {self.bond!r}")
            self.connect(other, self.prev, first or self.bond)
        self.bond = None

    def organic_atom(self) -> Atom:
        two = self.s[self.i:self.i + 2]
        if two in ("Cl", "Br"):
            self.i += 2
            return Atom(two)
        c = self.s[self.i]
        if c in NORMAL_VALENCES:
            self.i += 1
            return Atom(c)
        if c in ORGANIC_AROMATIC:
            self.i += 1
            return Atom(ORGANIC_AROMATIC[c], aromatic=True)
        raise self.fail(f"unexpected character {c!r} (atoms outside B C N O P S F Cl Br I need brackets)")

    def bracket_atom(self) -> Atom:
        end = self.s.find("]", self.i)
        if end < 0:
            raise self.fail("'[' without ']'")
        body, start = self.s[self.i + 1:end], self.i
        j = 0
        while j < len(body) and body[j].isdigit():  # isotope
            j += 1
        atom, j = self.bracket_element(body, j, start)
        while j < len(body) and body[j] == "@":  # chirality: read, not kept
            j += 1
        if j < len(body) and body[j] == "H":
            j += 1
            atom.hydrogens = 1
            if j < len(body) and body[j].isdigit():
                atom.hydrogens, j = int(body[j]), j + 1
        atom.charge, j = read_charge(body, j)
        if j < len(body) and body[j] == ":":  # atom class: read, not kept
            j += 1
            while j < len(body) and body[j].isdigit():
                j += 1
        if j != len(body):
            self.i = start + 1 + j
            raise self.fail(f"unexpected {body[j:]!r} in bracket atom [{body}]")
        self.i = end + 1
        return atom

    def bracket_element(self, body: str, j: int, start: int) -> tuple[Atom, int]:
        if body[j:j + 2] in BRACKET_AROMATIC:
            return Atom(BRACKET_AROMATIC[body[j:j + 2]], aromatic=True, bracket=True), j + 2
        if body[j:j + 1] in ORGANIC_AROMATIC:
            return Atom(ORGANIC_AROMATIC[body[j]], aromatic=True, bracket=True), j + 1
        if body[j:j + 2] in ELEMENTS and body[j + 1:j + 2].islower():
            return Atom(body[j:j + 2], bracket=True), j + 2
        if body[j:j + 1] in ELEMENTS:
            return Atom(body[j], bracket=True), j + 1
        self.i = start + 1 + j
        raise self.fail(f"unknown element in bracket atom [{body}]")

    def add_atom(self, atom: Atom) -> None:
        self.mol.atoms.append(atom)
        index = len(self.mol.atoms) - 1
        if self.prev is not None:
            self.connect(self.prev, index, self.bond)
        self.bond = None
        self.prev = index

    def connect(self, a: int, b: int, symbol: str | None) -> None:
        i, j = min(a, b), max(a, b)
        if any((x, y) == (i, j) for x, y, _ in self.mol.bonds):
            raise self.fail(f"a second bond between atoms {i} and {j}")
        both_aromatic = self.mol.atoms[a].aromatic and self.mol.atoms[b].aromatic
        order = BOND_ORDERS[symbol] if symbol else (AROMATIC if both_aromatic else 1.0)
        self.mol.bonds.append((i, j, order))


def read_charge(body: str, j: int) -> tuple[int, int]:
    """``+``, ``++``, ``+2``, ``-`` ... at body[j:] -> (charge, next index)."""
    if j >= len(body) or body[j] not in "+-":
        return 0, j
    sign = 1 if body[j] == "+" else -1
    k = j + 1
    if k < len(body) and body[k].isdigit():
        return sign * int(body[k]), k + 1
    while k < len(body) and body[k] == body[j]:
        k += 1
    return sign * (k - j), k


def add_implicit_hydrogens(mol: Molecule) -> None:
    bond_sum = [0.0] * len(mol.atoms)
    for i, j, order in mol.bonds:
        bond_sum[i] += 1.0 if order == AROMATIC else order
        bond_sum[j] += 1.0 if order == AROMATIC else order
    for atom, used in zip(mol.atoms, bond_sum):
        if atom.bracket or (atom.aromatic and atom.element in ("O", "S")):
            continue
        needed = used + (1 if atom.aromatic else 0)
        fitting = [v for v in NORMAL_VALENCES[atom.element] if v >= needed]
        atom.hydrogens = int(fitting[0] - needed) if fitting else 0


def parse_smiles(smiles: str) -> Molecule:
    """Atoms (element, charge, hydrogens, aromatic) and bonds (i, j, order) of a SMILES string."""
    return _Parser(smiles.strip()).parse()


def molecule_features(mol: Molecule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [atoms, NODE_FEATURES], edge_index [2, 2*bonds] (both directions), edge_attr [2*bonds, EDGE_FEATURES])."""
    degree = [0] * len(mol.atoms)
    for i, j, _ in mol.bonds:
        degree[i] += 1
        degree[j] += 1
    x = torch.zeros(len(mol.atoms), NODE_FEATURES)
    base = len(ELEMENT_VOCAB) + 1
    for n, atom in enumerate(mol.atoms):
        element = ELEMENT_VOCAB.index(atom.element) if atom.element in ELEMENT_VOCAB else len(ELEMENT_VOCAB)
        x[n, element] = 1.0
        x[n, base + min(atom.hydrogens, 4)] = 1.0
        x[n, base + 5 + min(degree[n], 4)] = 1.0
        x[n, base + 10] = float(atom.charge)
        x[n, base + 11] = float(atom.aromatic)
    pairs = [(i, j) for i, j, _ in mol.bonds] + [(j, i) for i, j, _ in mol.bonds]
    edge_index = torch.tensor(pairs, dtype=torch.long).t().reshape(2, -1)
    edge_attr = torch.zeros(len(pairs), EDGE_FEATURES)
    for e, (_, _, order) in enumerate(mol.bonds * 2):
        edge_attr[e, EDGE_ORDERS.index(order)] = 1.0
    return x, edge_index, edge_attr


def molecule_graph(molecules: str | list[str] | tuple[str, ...]):
    """A ``torch_geometric.data.Data`` for one molecule, or for several as one graph of disconnected
    parts (an atmosphere): names from the table or SMILES strings. An empty list gives an empty graph."""
    from torch_geometric.data import Data

    names = [molecules] if isinstance(molecules, str) else list(molecules)
    if not names:
        return Data(x=torch.zeros(0, NODE_FEATURES), edge_index=torch.zeros(2, 0, dtype=torch.long),
                    edge_attr=torch.zeros(0, EDGE_FEATURES))
    mol = parse_smiles(".".join(smiles_of(n) for n in names))
    x, edge_index, edge_attr = molecule_features(mol)
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr)
