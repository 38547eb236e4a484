"""generate / evaluate / export from a trainer checkpoint: determinism, clear errors, a hand-checked
probe set, and an export round trip."""

import json

import pytest
import torch
from torch import nn

from astrobio import evaluate as evaluate_cli
from astrobio import export as export_cli
from astrobio import generate as generate_cli
from astrobio.cli import run_cli
from astrobio.data import ByteTokenizer
from astrobio.inference.evaluation import physics_truth, run_probe, wilson_interval
from astrobio.inference.loading import iter_weights, load_model
from astrobio.model import build_model, get_config
from astrobio.train.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with one checkpoint of an (untrained) tiny model, as the trainer writes it."""
    root = tmp_path_factory.mktemp("run")
    model = build_model(get_config("tiny"), seed=7)
    config = {"model": "tiny", "tokenizer": None, "seq_len": 64, "seed": 0, "data": "builtin:300"}
    Checkpointer(root / "checkpoints", keep_last_k=2).save(3, model.state_dict(), {"config": config, "step": 3})
    return root, model


def test_generation_is_deterministic_and_streams(run_dir, capsys):
    root, _ = run_dir
    argv = ["--checkpoint", str(root), "--prompt", "star_mass: ", "--max-new-tokens", "24", "--seed", "5",
            "--top-k", "40", "--top-p", "0.95"]
    assert run_cli(generate_cli.main, argv) == 0
    first = capsys.readouterr().out
    assert run_cli(generate_cli.main, argv) == 0
    assert capsys.readouterr().out == first and first.startswith("star_mass: ")


def test_loaded_weights_equal_the_saved_model(run_dir):
    root, model = run_dir
    loaded, config, path = load_model(root)
    assert path.name == "step-3" and config["model"] == "tiny"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_corrupt_and_wrong_size_checkpoints_are_clear_errors(run_dir, tmp_path, capsys):
    root, _ = run_dir
    assert run_cli(generate_cli.main, ["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    Checkpointer(bad / "checkpoints", 1).save(1, build_model(get_config("tiny")).state_dict(),
                                               {"config": {"model": "small"}})
    assert run_cli(generate_cli.main, ["--checkpoint", str(bad / "checkpoints" / "step-1"), "--prompt", "x"]) == 2
    assert "does not hold a 'small' model" in capsys.readouterr().err
    weights = bad / "checkpoints" / "step-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert run_cli(export_cli.main, ["--checkpoint", str(weights.parent), "--out", str(tmp_path / "o")]) == 2
    assert "truncated" in capsys.readouterr().err


def test_physics_truth_on_hand_checked_records():
    # luminosity 1.00 Lsun; flux = L / a^2: a = 1.00 AU -> 1.00 (inside 0.36..1.11, 'yes'); a = 0.5 -> 4.0 ('no')
    head = "system: T\nstar_mass: 1.00\nstar_radius: 1.00\nstar_teff: 5772\nspectral_type: G2V\nluminosity: 1.00\n"
    planet = "planet: b\nmass: {m}\nradius: 1.00\nalbedo: 0.30\na: {a}\n"
    assert physics_truth(head + planet.format(m="1.00", a="1.00") + "hz: ", "hz") == "yes"
    assert physics_truth(head + planet.format(m="1.00", a="0.500") + "hz: ", "hz") == "no"
    assert physics_truth(head + planet.format(m="1.00", a="2.00") + "hz: ", "hz") == "no"  # flux 0.25
    assert physics_truth(head + planet.format(m="1.00", a="1.00") + "type: ", "type") == "terran"
    assert physics_truth(head + planet.format(m="318", a="1.00") + "type: ", "type") == "jovian"


def test_wilson_interval_matches_hand_computation():
    low, high = wilson_interval(80, 100)  # p=0.8, n=100, z=1.96: centre 0.7887, half 0.0776
    assert abs(low - 0.7112) < 1e-3 and abs(high - 0.8666) < 1e-3


class AlwaysNo(nn.Module):
    """A 'model' that always predicts the bytes of 'no\\n': its accuracy must equal the share of 'no'."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        logits[..., ord("n")] = 5.0
        logits[..., ord("o")] = 4.0
        logits[..., ord("\n")] = 3.0
        return logits


def test_probe_scores_a_constant_model_at_its_label_share():
    from astrobio.data import load_records
    records = load_records("builtin:40", seed=3)
    result = run_probe(AlwaysNo(259), ByteTokenizer(), records, "hz", "test", context=64, limit=60)
    assert result.majority_label == "no"
    assert result.accuracy == pytest.approx(result.majority_baseline)
    assert result.ci_low <= result.accuracy <= result.ci_high


def test_evaluate_refuses_bad_arguments_before_running_the_model(run_dir, capsys, tmp_path, monkeypatch):
    root, _ = run_dir
    monkeypatch.setattr(evaluate_cli, "load_model", None)  # any model work would raise a TypeError
    assert run_cli(evaluate_cli.main, ["--checkpoint", str(root), "--catalogue", str(tmp_path / "missing.xml.gz")]) == 2
    assert "missing.xml.gz" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli(evaluate_cli.main, ["--checkpoint", str(root), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_evaluate_reads_data_as_the_trainer_does_and_never_shows_its_secret(run_dir, tmp_path, capsys):
    root, _ = run_dir
    table = tmp_path / "planets.csv"
    table.write_text("name,mass\n" + "".join(f"p{i},{i * 0.37:.2f}\n" for i in range(400)))
    result = evaluate_cli.evaluate(str(root), data=str(table), max_examples=2, max_batches=1, catalogue=None)
    assert result["data"] == str(table) and result["val_loss"] > 4.0
    secret = "hunter2-secret"
    assert run_cli(evaluate_cli.main, ["--checkpoint", str(root), "--data", f"file://user:{secret}@host/t.csv"]) == 2
    captured = capsys.readouterr()
    assert "host/t.csv" in captured.err and secret not in captured.err + captured.out


def test_evaluate_reports_loss_and_probes(run_dir):
    root, _ = run_dir
    result = evaluate_cli.evaluate(str(root), max_examples=10, max_batches=2, catalogue=None)
    assert result["val_loss"] > 4.0  # untrained byte model: near ln(259) = 5.56
    fields = [p["field"] for p in result["probes"]]
    assert fields[:2] == ["hz", "type"] and all(p["examples"] == 10 for p in result["probes"])


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_export_round_trip(run_dir, tmp_path, capsys, fmt):
    root, model = run_dir
    out = tmp_path / fmt
    assert run_cli(export_cli.main, ["--checkpoint", str(root), "--out", str(out), "--format", fmt,
                                     "--dtype", "fp32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"] == "llama") if fmt == "hf" else (config["model"]["d_model"] == 128)
    assert run_cli(export_cli.main, ["--checkpoint", str(root), "--out", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    if fmt == "safetensors":
        from safetensors.torch import load_file
        exported = {}
        for f in out.glob("*.safetensors"):
            exported.update(load_file(f))
        assert set(exported) == set(model.state_dict())
        for name, tensor in iter_weights(root / "checkpoints" / "step-3"):
            assert torch.equal(exported[name], tensor), name


def test_export_copies_a_tokenizer_named_by_its_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1, "star": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    files, bos, eos = export_cli.tokenizer_files({"tokenizer": str(tmp_path)})  # the folder, as --tokenizer allows
    assert files == {"tokenizer.json": (tmp_path / "tokenizer.json").read_text()}
    assert bos == eos == 1  # no BOS in the file: BOS falls back to EOS
