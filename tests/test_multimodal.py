"""Multimodal inputs: the SMILES parser against hand-checked molecules, molecule graphs, catalogue features,
the encoders as prefixes of the tiny model (a training step, gradients, missing modalities), and the Open
Exoplanet Catalogue end to end."""

import gzip
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astrobio.data import ByteTokenizer
from astrobio.data.catalogue import FEATURE_KEYS, NUM_FEATURES, catalogue_features, denormalise, feature_vector
from astrobio.data.molecules import (ELEMENT_VOCAB, MOLECULES, NODE_FEATURES, SMILESError, molecule_graph,
                                     parse_smiles)
from astrobio.data.multimodal import (MultimodalExample, MultimodalLoader, builtin_examples, collate, load_examples)
from astrobio.model import build_model, build_stage, get_config, split_model
from astrobio.model.encoders import build_prefix, check_modalities, prefix_lm_loss, prefix_positions

OEC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oec_systems.xml.gz"
needs_oec = pytest.mark.skipif(not OEC.is_file(), reason=f"{OEC} is absent (the shared Open Exoplanet Catalogue "
                               "file lies beside the repository only on the project's machines)")
SEQ = 48


# --- SMILES ------------------------------------------------------------------------------------------

# (SMILES, heavy atoms, bonds, Hill formula), counted by hand from the structures
KNOWN = [
    ("CSC", 3, 2, "C2H6S"),                   # dimethyl sulfide
    ("c1ccccc1", 6, 6, "C6H6"),               # benzene
    ("Nc1ncnc2[nH]cnc12", 10, 11, "C5H5N5"),  # adenine: fused rings, [nH]
    ("[O-][O+]=O", 3, 2, "O3"),               # ozone
    ("CC(=C)C=C", 5, 4, "C5H8"),              # isoprene: a branch
    ("C1CC1", 3, 3, "C3H6"),                  # cyclopropane
    ("C%10CCC%10", 4, 4, "C4H8"),             # cyclobutane with a two-digit ring number
    ("[13CH4]", 1, 0, "CH4"),                 # isotope, explicit hydrogens
    ("C[C@@H](N)C(=O)O", 6, 5, "C3H7NO2"),    # alanine: chirality read and dropped
    ("c1ccncc1", 6, 6, "C5H5N"),              # pyridine
    ("c1ccsc1", 5, 5, "C4H4S"),               # thiophene: aromatic s takes no hydrogen
    ("O.O", 2, 0, "H4O2"),                    # two waters, disconnected
    ("OCl(=O)(=O)=O", 5, 4, "ClHO4"),         # perchloric acid (Hill order: Cl, H, O); Cl beyond valence 1
    ("C/C=C\\C", 4, 3, "C4H8"),               # 2-butene with directional bonds
]


@pytest.mark.parametrize("smiles, atoms, bonds, formula", KNOWN)
def test_smiles_parser_counts_atoms_bonds_and_hydrogens(smiles, atoms, bonds, formula):
    mol = parse_smiles(smiles)
    assert (len(mol.atoms), len(mol.bonds), mol.formula()) == (atoms, bonds, formula)


def test_benzene_is_an_aromatic_ring_of_six_ch():
    mol = parse_smiles("c1ccccc1")
    assert all(a.aromatic and a.element == "C" and a.hydrogens == 1 for a in mol.atoms)
    assert sorted((i, j) for i, j, _ in mol.bonds) == [(0, 1), (0, 5), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert {order for _, _, order in mol.bonds} == {1.5}


def test_bracket_atoms_keep_charges_and_bond_orders():
    ozone = parse_smiles("[O-][O+]=O")
    assert [a.charge for a in ozone.atoms] == [-1, 1, 0]
    assert [order for _, _, order in ozone.bonds] == [1.0, 2.0]
    co = parse_smiles("[C-]#[O+]")
    assert [(a.element, a.charge, a.hydrogens) for a in co.atoms] == [("C", -1, 0), ("O", 1, 0)]
    assert co.bonds == [(0, 1, 3.0)]
    ammonium = parse_smiles("[NH4+]").atoms[0]
    assert (ammonium.charge, ammonium.hydrogens) == (1, 4)


def test_every_table_molecule_parses_to_its_hand_written_formula():
    asked = {"H2O", "CO2", "CH4", "O2", "O3", "N2O", "NH3", "PH3", "CH3Cl", "DMS", "H2S", "SO2", "CO", "HCN"}
    assert asked <= set(MOLECULES)
    for name, info in MOLECULES.items():
        assert parse_smiles(info.smiles).formula() == info.formula, name


@pytest.mark.parametrize("smiles, message", [
    ("C1CC", "unclosed ring bond 1"),
    ("C(C", r"unclosed branch '\('"),
    ("C)C", r"unmatched '\)'"),
    ("C==C", "two bonds in a row"),
    ("[Xx]", r"unknown element in bracket atom \[Xx\]"),
    ("CQ", "unexpected character 'Q'"),
    ("C=1CCC-1", "ring bond 1 written as '=' and '-'"),
    ("", "empty SMILES"),
])
def test_smiles_errors_say_what_and_where(smiles, message):
    with pytest.raises(SMILESError, match=message):
        parse_smiles(smiles)


def test_molecule_graph_features_and_edges():
    g = molecule_graph("DMS")
    assert g.x.shape == (3, NODE_FEATURES) and g.edge_index.shape == (2, 4) and g.edge_attr.shape == (4, 5)
    assert sorted(map(tuple, g.edge_index.t().tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert torch.equal(g.edge_attr[:, 0], torch.ones(4))  # all single bonds
    sulfur, carbon = ELEMENT_VOCAB.index("S"), ELEMENT_VOCAB.index("C")
    assert g.x[1, sulfur] == 1 and g.x[0, carbon] == 1 and g.x[2, carbon] == 1
    base = len(ELEMENT_VOCAB) + 1
    assert g.x[0, base + 3] == 1 and g.x[1, base] == 1  # CH3 and S: 3 and 0 hydrogens
    atmosphere = molecule_graph(["H2O", "CH4", "O2"])
    assert atmosphere.num_nodes == 4 and atmosphere.edge_index.shape[1] == 2
    assert molecule_graph([]).num_nodes == 0


# --- catalogue features ------------------------------------------------------------------------------


def test_catalogue_features_normalise_in_log_space_and_mask_missing_values():
    values, mask = feature_vector({"planet_mass": 1.0, "eccentricity": "0.3", "star_temperature": -5,
                                   "period": "", "distance": float("nan")})
    got = dict(zip(FEATURE_KEYS, zip(values, mask)))
    assert got["planet_mass"] == (pytest.approx((0.0 - 1.5) / 1.2), True)     # log10(1 M_earth) = 0
    assert got["eccentricity"] == (pytest.approx((0.3 - 0.1) / 0.2), True)    # linear
    for key in ("star_temperature", "period", "distance", "planet_radius"):  # negative, empty, nan, absent
        assert got[key] == (0.0, False)
    archive, _ = feature_vector({"pl_bmassj": 1.0, "st_teff": "5772"})       # NASA archive column names
    assert denormalise("planet_mass", archive[0]) == pytest.approx(317.83)
    assert denormalise("star_temperature", archive[FEATURE_KEYS.index("star_temperature")]) == pytest.approx(5772)
    values, mask = catalogue_features([None, {"radius": 3}])
    assert values.shape == mask.shape == (2, NUM_FEATURES) and not mask.any()


@pytest.fixture(scope="module")
def oec_examples():
    """The catalogue read once, through the data URI path a run takes (``load_examples``)."""
    if not OEC.is_file():
        pytest.skip(f"{OEC} is absent (the shared catalogue lies beside the repository only on the project's machines)")
    return load_examples(str(OEC))


@needs_oec
def test_oec_rows_match_an_independent_reading_of_the_xml(oec_examples):
    rows = [e.catalogue for e in oec_examples]
    root = ET.fromstring(gzip.decompress(OEC.read_bytes()))
    assert len(rows) == sum(1 for _ in root.iter("planet")) == 5414
    row = next(r for r in rows if r["name"] == "11 Com b")
    system = next(s for s in root.iter("system") if s.findtext("name") == "11 Com")
    star, planet = system.find("star"), system.find("star/planet")
    assert row["planet_mass"] == pytest.approx(float(planet.findtext("mass")) * 317.83)
    assert row["period"] == pytest.approx(float(planet.findtext("period")))
    assert row["star_temperature"] == pytest.approx(float(star.findtext("temperature")))
    assert row["distance"] == pytest.approx(float(system.findtext("distance")))
    assert row["planet_radius"] is None and star.find("planet/radius") is None
    values, mask = catalogue_features(rows)
    assert 0.3 < mask.float().mean() < 1.0  # real catalogue: many values present, many missing
    assert values[mask].abs().mean() < 1.5  # the fixed normalisation centres the real values


# --- encoders and the model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return cfg, build_model(cfg, seed=0)


def mixed_examples():
    """Synthetic examples with every modality, one with none, one with a catalogue only."""
    examples = builtin_examples(systems=4, seed=3)[:4]
    return examples + [MultimodalExample("a note with no record"),
                       MultimodalExample("catalogue only", {"planet_mass": 5.0, "period": 12.0})]


def test_a_multimodal_training_step_reaches_every_encoder_parameter(tiny):
    cfg, _ = tiny
    model = build_model(cfg, seed=0)
    prefix = build_prefix(cfg.d_model, "text,catalogue,graph", seed=0)
    batch = collate(mixed_examples(), ByteTokenizer(), SEQ)
    params = list(model.parameters()) + list(prefix.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = [p.detach().clone() for p in prefix.parameters()]
    logits = model(batch.tokens, prefix=prefix(**batch.prefix_inputs()))
    assert logits.shape == (batch.batch_size, prefix.prefix_len + SEQ, cfg.vocab_size)
    loss = prefix_lm_loss(logits, batch.targets, prefix.prefix_len)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(cfg.vocab_size)) < 1.0
    loss.backward()
    for name, p in prefix.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, prefix.parameters()))


def test_missing_modalities_use_the_learned_missing_embeddings(tiny):
    cfg, model = tiny
    prefix = build_prefix(cfg.d_model, ["catalogue", "graph"], seed=1)
    batch = collate(mixed_examples(), ByteTokenizer(), SEQ)
    out = prefix(**batch.prefix_inputs())
    k = prefix.encoders["catalogue"].tokens
    assert torch.equal(out[4, :k], prefix.missing["catalogue"]) and torch.equal(out[4, k:], prefix.missing["graph"])
    assert torch.equal(out[5, k:], prefix.missing["graph"]) and not torch.equal(out[5, :k], prefix.missing["catalogue"])
    assert not torch.equal(out[0, k:], prefix.missing["graph"])
    text_only = collate(mixed_examples(), ByteTokenizer(), SEQ, modalities=("text",))
    assert text_only.graphs is None and text_only.catalogue_values is None
    out = prefix(**text_only.prefix_inputs())  # a batch with both modalities absent
    assert out.shape == (6, prefix.prefix_len, cfg.d_model)
    loss = prefix_lm_loss(model(text_only.tokens, prefix=out), text_only.targets, prefix.prefix_len)
    assert math.isfinite(loss.item())


def test_the_prefix_informs_the_token_predictions(tiny):
    cfg, model = tiny
    prefix = build_prefix(cfg.d_model, "catalogue", seed=2)
    batch = collate(builtin_examples(systems=2, seed=0)[:2], ByteTokenizer(), SEQ, modalities=("catalogue",))
    base = model(batch.tokens, prefix=prefix(**batch.prefix_inputs()))
    batch.catalogue_values = batch.catalogue_values + 1.0
    changed = model(batch.tokens, prefix=prefix(**batch.prefix_inputs()))
    assert not torch.allclose(base[:, prefix.prefix_len:], changed[:, prefix.prefix_len:])


def test_prefix_lm_loss_scores_token_positions_only():
    torch.manual_seed(0)
    p, t, v = 3, 5, 11
    logits = torch.randn(2, p + t, v)
    targets = torch.randint(0, v, (2, t))
    targets[1, 3:] = -100
    reference = [-F.log_softmax(logits[b, p + i], -1)[targets[b, i]] for b in range(2) for i in range(t)
                 if targets[b, i] != -100]
    assert prefix_lm_loss(logits, targets, p).item() == pytest.approx(torch.stack(reference).mean().item(), rel=1e-6)
    logits[:, :p] = torch.randn(2, p, v) * 100  # the prefix positions do not count
    assert prefix_lm_loss(logits, targets, p).item() == pytest.approx(torch.stack(reference).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match a prefix of 4"):
        prefix_lm_loss(logits, targets, 4)


def test_the_graph_encoder_ignores_atom_order():
    prefix = build_prefix(32, "graph", seed=0).eval()
    from torch_geometric.data import Batch

    graphs = Batch.from_data_list([molecule_graph("CCO"), molecule_graph("OCC"), molecule_graph("C(O)C")])
    out = prefix(3, graphs=graphs)
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[0], out[2], atol=1e-5)
    other = prefix(1, graphs=Batch.from_data_list([molecule_graph("COC")]))  # dimethyl ether: same formula
    assert not torch.allclose(out[0], other[0], atol=1e-3)


def test_encoders_on_stage_zero_give_the_whole_model_result(tiny):
    cfg, model = tiny
    prefix = build_prefix(cfg.d_model, "catalogue,graph", seed=0)
    batch = collate(mixed_examples(), ByteTokenizer(), SEQ)
    embeddings = prefix(**batch.prefix_inputs())
    first, last = split_model(model, [2, 2])
    assert torch.allclose(last(first(batch.tokens, prefix=embeddings)), model(batch.tokens, prefix=embeddings),
                          atol=1e-5)


def test_prefix_inputs_that_do_not_fit_the_batch_are_clear_errors():
    prefix = build_prefix(32, "catalogue,graph", seed=0)
    batch = collate(builtin_examples(systems=2, seed=0)[:3], ByteTokenizer(), SEQ)
    inputs = batch.prefix_inputs()
    with pytest.raises(ValueError, match="catalogue values cover 3 examples but the batch has 4"):
        prefix(**{**inputs, "batch_size": 4})
    with pytest.raises(ValueError, match="without their catalogue_mask"):
        prefix(**{**inputs, "catalogue_mask": None})
    with pytest.raises(ValueError, match=r"catalogue values \(3, 11\) and mask \(3, 10\)"):
        prefix(**{**inputs, "catalogue_mask": inputs["catalogue_mask"][:, :10]})


def test_modality_names_are_checked():
    assert check_modalities("text,catalogue,graph") == ("catalogue", "graph")
    assert check_modalities("graph,text") == ("graph",)
    with pytest.raises(ValueError, match="unknown modality 'images'"):
        check_modalities("text,images")
    with pytest.raises(ValueError, match="name no prefix modality"):
        build_prefix(32, "text")
    # the trainer's prefix length, known without building the encoders
    assert prefix_positions("text,graph,catalogue") == build_prefix(32, "graph,catalogue").prefix_len
    assert prefix_positions("graph") == build_prefix(32, "graph").prefix_len and prefix_positions("text") == 0


# --- data to batches ---------------------------------------------------------------------------------


def test_examples_from_a_jsonl_table(tmp_path):
    rows = [{"text": "K2-18 b", "catalogue": {"pl_rade": 2.6, "pl_orbper": 32.9}, "molecules": ["CH4", "CO2", "DMS"]},
            {"text": "no molecules", "catalogue": {"pl_rade": 1.0}},
            {"pl_name": "TRAPPIST-1 e", "pl_rade": 0.92, "molecules": "N2;CO2 O"}]
    path = tmp_path / "planets.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_examples(str(path))
    assert [e.molecules for e in examples] == [("CH4", "CO2", "DMS"), (), ("N2", "CO2", "O")]
    assert examples[2].text == "pl_name: TRAPPIST-1 e\npl_rade: 0.92"
    batch = collate(examples, ByteTokenizer(), 16)
    assert batch.graphs.num_graphs == 3 and batch.catalogue_mask.sum(dim=1).tolist() == [2, 1, 1]
    ids = [ByteTokenizer.bos_id] + list(b"no molecules") + [ByteTokenizer.eos_id]  # 14 ids: 13 inputs, 13 targets
    assert batch.tokens[1].tolist() == ids[:-1] + [ByteTokenizer.pad_id] * 3
    assert batch.targets[1].tolist() == ids[1:] + [-100] * 3


def test_loader_resumes_at_the_same_batch():
    examples = builtin_examples(systems=10, seed=0)
    a = MultimodalLoader(examples, ByteTokenizer(), 32, 4, seed=7)
    for _ in range(a.batches_per_epoch + 1):  # into the second epoch, whose order differs
        next(a)
    saved = json.loads(json.dumps(a.state_dict()))
    assert (saved["epoch"], saved["position"]) == (1, 1)
    b = MultimodalLoader(examples, ByteTokenizer(), 32, 4, seed=7)
    b.load_state_dict(saved)
    x, y = next(a), next(b)
    assert torch.equal(x.tokens, y.tokens) and torch.equal(x.catalogue_values, y.catalogue_values)
    assert torch.equal(x.graphs.x, y.graphs.x)
    for bad in ({"epoch": -1}, {"epoch": None}, {"position": b.batches_per_epoch}, {"seed": 8}):
        with pytest.raises(ValueError):
            b.load_state_dict({**saved, **bad})
    assert (b.epoch, b.position) == (1, 2)  # a refused state changes nothing


@needs_oec
def test_the_open_exoplanet_catalogue_goes_through_end_to_end(tiny, oec_examples):
    cfg, model = tiny
    examples = oec_examples
    assert len(examples) == 5414 and examples[0].text.startswith("system: 11 Com")
    chosen = [examples[i] for i in range(0, len(examples), 677)]
    batch = collate(chosen, ByteTokenizer(), SEQ)
    assert batch.catalogue_mask.any(dim=1).all() and batch.graphs.num_nodes == 0  # no molecules in the OEC
    prefix = build_prefix(cfg.d_model, "text,catalogue,graph", seed=0)
    loss = prefix_lm_loss(model(batch.tokens, prefix=prefix(**batch.prefix_inputs())), batch.targets, prefix.prefix_len)
    loss.backward()
    assert math.isfinite(loss.item())
    assert prefix.encoders["catalogue"].net[0].weight.grad.abs().sum() > 0


# --- two pipeline stages, the encoders on stage 0 ----------------------------------------------------

MODALITIES = ("catalogue", "graph")
SPLIT = [2, 2]


def pipeline_batches():
    """4 training micro-batches of 3 examples (one with no record, one with a catalogue row only: every
    missing embedding gets a gradient) and 2 validation batches."""
    examples = mixed_examples() + builtin_examples(systems=6, seed=5)[:8]
    batches = [collate(examples[i:i + 3], ByteTokenizer(), SEQ) for i in range(0, 12, 3)]
    val = [collate(builtin_examples(systems=2, seed=9)[i:i + 2], ByteTokenizer(), SEQ) for i in (0, 2)]
    return batches, val


def two_stage_steps(ctx):
    """One rank: a step under each schedule (gradients read, then cleared), then an evaluation."""
    from astrobio.train.pipeline import PipelineStepRunner, Ranks
    cfg = get_config("tiny")
    stage = build_stage(cfg, ctx.rank, SPLIT, seed=0)
    prefix = build_prefix(cfg.d_model, MODALITIES, seed=0) if ctx.rank == 0 else None
    prefix_len = build_prefix(cfg.d_model, MODALITIES, device="meta").prefix_len
    named = [*stage.named_parameters(), *(() if prefix is None else
                                          ((f"prefix.{n}", p) for n, p in prefix.named_parameters()))]
    train, val = pipeline_batches()
    out = {}
    for schedule in ("1f1b", "zb-h1"):
        runner = PipelineStepRunner(stage, Ranks(ctx), schedule, ctx.device, False, prefix, prefix_len)
        loss = runner.forward_backward(train)
        out[schedule] = loss, {n: p.grad.clone() for n, p in named if p.grad is not None}
        for _, p in named:
            p.grad = None
    out["val"] = runner.evaluate(val)
    return out


@pytest.fixture(scope="module")
def single_process_step():
    """The whole model and the encoders in this process, on the same micro-batches (the trainer's
    one-stage runner)."""
    from astrobio.train.local import LocalStepRunner
    cfg = get_config("tiny")
    model, prefix = build_model(cfg, seed=0), build_prefix(cfg.d_model, MODALITIES, seed=0)
    runner = LocalStepRunner(model, torch.device("cpu"), False, prefix)
    train, val = pipeline_batches()
    loss = runner.forward_backward(train)
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({f"prefix.{n}": p.grad for n, p in prefix.named_parameters()})
    return loss, grads, runner.evaluate(val)


def test_two_stages_with_the_encoders_on_stage_zero_equal_one_process(single_process_step):
    from astrobio.parallel.launch import launch
    loss, grads, val_loss = single_process_step
    ranks = launch(two_stage_steps, 2, timeout_s=60, backend="gloo")
    encoders = [n for n in grads if n.startswith("prefix.")]
    assert encoders and all(grads[n].abs().sum() > 0 for n in encoders)  # the reference reaches every encoder
    for schedule in ("1f1b", "zb-h1"):
        (loss0, grads0), (loss1, grads1) = ranks[0][schedule], ranks[1][schedule]
        assert loss0 == loss1 == pytest.approx(loss, rel=1e-6), schedule
        assert not any(n.startswith("prefix.") for n in grads1)  # the encoders live on stage 0 only
        got = {**grads0, **grads1}
        assert set(got) == set(grads), schedule  # every parameter, each encoder's included, got a gradient
        for name in grads:
            torch.testing.assert_close(got[name], grads[name], rtol=1e-5, atol=1e-7, msg=f"{schedule} {name}")
    assert ranks[0]["val"] == ranks[1]["val"] == pytest.approx(val_loss, rel=1e-6)


CLI_RUN = ("--modalities", "text,catalogue,graph", "--data", "builtin:60", "--seq-len", "48", "--micro-batch-size", "4",
           "--gradient-accumulation-steps", "2", "--eval-batches", "1", "--warmup-steps", "2", "--steps", "6")


def test_a_multimodal_run_moves_between_one_and_two_stages(tmp_path):
    """Through the CLI: 1 stage for steps 1-2, 2 stages for 3-4, 1 stage for 5-6, as one straight run;
    the 2-stage checkpoint holds the encoders (stage 0's optimizer part has their state)."""
    from astrobio.train import main
    from astrobio.train.checkpoint import load_checkpoint, read_part
    from astrobio.train.logging import read_metrics

    def train(out, stages, *extra):
        assert main([*CLI_RUN, "--output-dir", str(out), "--pipeline-stages", str(stages), *extra]) == 0

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    straight, hops = tmp_path / "straight", tmp_path / "hops"
    train(straight, 1)
    train(hops, 1, "--stop-at-step", "2")
    train(hops, 2, "--resume", "auto", "--stop-at-step", "4")
    parts = hops / "checkpoints" / "step-4"
    _, state, _ = load_checkpoint(parts)
    initial = build_prefix(128, MODALITIES, seed=0).state_dict()
    assert set(state["prefix"]) == set(initial)
    assert sum(not torch.equal(state["prefix"][k], initial[k]) for k in initial) > len(initial) // 2  # trained
    stage0, stage1 = (set(read_part(parts, f"optimizer-stage{s}")["state"]) for s in (0, 1))
    assert {f"prefix.{k}" for k in dict(build_prefix(128, MODALITIES).named_parameters())} <= stage0
    assert not any(n.startswith("prefix.") for n in stage1)
    train(hops, 1, "--resume", "auto")
    assert len(losses(hops)) == 6
    assert losses(hops) == pytest.approx(losses(straight), rel=1e-5)
