"""Evaluation: validation loss and perplexity on a data source, and a task accuracy.

The task probe asks the model to complete a derived field of a record (habitable-zone membership
``hz``, or the planet's mass class ``type``) from the record before it. Each candidate label is scored
by the model's log-probability of ``label + "\\n"`` after the prompt, and the best one is the
prediction (ranking, so a model cannot lose points to formatting). The truth is recomputed from the
record's own printed quantities with the physics that generated the corpus (``astrobio.data.derive``),
not read from the text. Accuracy comes with a 95% Wilson interval and the majority-class baseline
of the same examples; balanced accuracy (the mean of the per-class recalls, which a constant answer
cannot lift above 1 / classes however skewed the labels) comes with a 95% interval and the confusion
matrix it is computed from.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from astrobio.data import derive, field_completions, load_records, parse_record, split_records

PROBE_FIELDS = ("hz", "type")  # the fields the task probes complete

PROBE_LABELS = {"hz": ("yes", "no"), "type": ("terran", "neptunian", "jovian")}
Z95 = 1.959964  # the two-sided 95% quantile of the normal distribution


@dataclass
class ProbeResult:
    field: str
    source: str
    examples: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    majority_label: str
    majority_baseline: float
    labels: tuple[str, ...]
    confusion: list[list[int]]  # confusion[i][j]: examples of truth labels[i] predicted as labels[j]
    balanced_accuracy: float
    balanced_ci_low: float
    balanced_ci_high: float
    majority_balanced_accuracy: float  # a constant answer's: 1 / (labels that occur in the truth)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The accuracy line, the balanced-accuracy line and the confusion matrix (rows: truth)."""
        corner = "truth \\ predicted"
        first = max(len(corner), *(len(label) for label in self.labels))
        width = max(max(len(label) for label in self.labels), 5) + 2
        table = ["    " + corner.ljust(first) + "".join(label.rjust(width) for label in self.labels)]
        table += ["    " + label.ljust(first) + "".join(str(n).rjust(width) for n in row)
                  for label, row in zip(self.labels, self.confusion)]
        return [f"{self.field} on {self.source}: accuracy {self.accuracy:.1%} "
                f"(95% CI {self.ci_low:.1%}-{self.ci_high:.1%}, n={self.examples}); "
                f"majority class '{self.majority_label}' {self.majority_baseline:.1%}",
                f"  balanced accuracy {self.balanced_accuracy:.1%} (95% CI {self.balanced_ci_low:.1%}-"
                f"{self.balanced_ci_high:.1%}); majority class {self.majority_balanced_accuracy:.1%}",
                "  confusion matrix:", *table]


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion_matrix(truths: list[str], predictions: list[str], labels: tuple[str, ...]) -> list[list[int]]:
    """``matrix[i][j]``: how many examples of truth ``labels[i]`` were predicted as ``labels[j]``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for truth, prediction in zip(truths, predictions, strict=True):
        matrix[index[truth]][index[prediction]] += 1
    return matrix


def balanced_accuracy(confusion: list[list[int]], z: float = Z95) -> tuple[float, float, float]:
    """(balanced accuracy, 95% interval low, high) from a confusion matrix.

    Balanced accuracy is the mean recall over the classes that occur in the truth. Its interval is
    Agresti-Coull's per class, combined as independent binomials: each recall is shifted to
    (correct + z^2/2) / (n + z^2) with variance r (1 - r) / (n + z^2), and the mean of the shifted
    recalls +- z times the standard error of their mean. The shift keeps a class whose recall is 0 or 1
    on few examples from claiming certainty (the plain Wald interval would have zero width there).
    """
    counts = [(row[i], sum(row)) for i, row in enumerate(confusion) if sum(row) > 0]
    if not counts:
        return 0.0, 0.0, 1.0
    k = len(counts)
    value = sum(correct / n for correct, n in counts) / k
    shifted = [((correct + z * z / 2) / (n + z * z), n + z * z) for correct, n in counts]
    centre = sum(r for r, _ in shifted) / k
    half = z * math.sqrt(sum(r * (1 - r) / n for r, n in shifted)) / k
    return value, max(0.0, centre - half), min(1.0, centre + half)


def physics_truth(prompt: str, field: str) -> str | None:
    """The field's value for the last planet in ``prompt``, recomputed by the corpus physics from the
    sampled quantities printed before it (every derived field in the chain is recomputed)."""
    text = prompt[: prompt.rfind("\n")] if "\n" in prompt else prompt  # drop the open 'field: ' line
    derived = derive(parse_record(text))
    if not derived["planets"]:
        return None
    value = derived["planets"][-1].get(field)
    return None if value is None else str(value)


def probe_examples(records: list[str], field: str, limit: int, physics: bool = True) -> list[tuple[str, str]]:
    """(prompt, truth) pairs, at most ``limit``; ``physics`` recomputes the truth (built-in corpus);
    otherwise the printed value is taken (catalogue records, derived by the reader from real values)."""
    labels = PROBE_LABELS[field]
    examples = []
    for record in records:
        for prompt, printed in field_completions(record, field):
            truth = physics_truth(prompt, field) if physics else printed
            if truth in labels:
                examples.append((prompt, truth))
            if len(examples) >= limit:
                return examples
    return examples


@torch.no_grad()
def label_scores(model, tokenizer, prompt: str, labels: tuple[str, ...], context: int) -> torch.Tensor:
    """Log-probability of each ``label + "\\n"`` after the last ``context`` tokens of the prompt."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    answers = [tokenizer.encode(label + "\n") for label in labels]
    keep = max(1, context - max(len(a) for a in answers))
    prompt_ids = prompt_ids[-keep:]
    length = len(prompt_ids) + max(len(a) for a in answers)
    batch = torch.full((len(labels), length), tokenizer.pad_id, dtype=torch.long)
    for i, answer in enumerate(answers):
        row = prompt_ids + answer
        batch[i, : len(row)] = torch.tensor(row)
    logprobs = F.log_softmax(model(batch.to(device)).float(), dim=-1)
    scores = []
    for i, answer in enumerate(answers):
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer))
        targets = torch.tensor(answer)
        scores.append(logprobs[i, positions, targets].sum())
    return torch.stack(scores)


def run_probe(model, tokenizer, records: list[str], field: str, source: str, context: int,
              limit: int = 400, physics: bool = True) -> ProbeResult:
    labels = PROBE_LABELS[field]
    examples = probe_examples(records, field, limit, physics)
    if not examples:
        raise ValueError(f"no record of {source} holds a '{field}:' line to probe")
    truths = [truth for _, truth in examples]
    predictions = [labels[int(label_scores(model, tokenizer, prompt, labels, context).argmax())]
                   for prompt, _ in examples]
    return probe_result(field, source, labels, truths, predictions)


def probe_result(field: str, source: str, labels: tuple[str, ...], truths: list[str],
                 predictions: list[str]) -> ProbeResult:
    """Accuracy, balanced accuracy, their intervals and baselines, and the confusion matrix."""
    correct = sum(t == p for t, p in zip(truths, predictions, strict=True))
    counts = Counter(truths)
    majority, majority_count = counts.most_common(1)[0]
    low, high = wilson_interval(correct, len(truths))
    confusion = confusion_matrix(truths, predictions, labels)
    balanced, balanced_low, balanced_high = balanced_accuracy(confusion)
    return ProbeResult(field, source, len(truths), correct, correct / len(truths), low, high, majority,
                       majority_count / len(truths), labels, confusion, balanced, balanced_low, balanced_high,
                       1.0 / len(counts))


@torch.no_grad()
def validation_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 8,
                    max_batches: int | None = None) -> dict:
    """Mean next-token loss over consecutive windows of ``tokens`` and its perplexity."""
    from astrobio.data import PackedLoader
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"the evaluation split ({len(tokens)} tokens) is shorter than one sequence of "
                         f"{seq_len + 1} tokens; use more data or a smaller --seq-len")
    loader = PackedLoader(tokens, seq_len, min(batch_size, windows), seed=0, shuffle=False)
    count = loader.batches_per_epoch if max_batches is None else min(max_batches, loader.batches_per_epoch)
    device = next(model.parameters()).device
    total, n = 0.0, 0
    it = iter(loader)
    for _ in range(count):
        inputs, targets = next(it)
        logits = model(inputs.to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
        n += targets.numel()
    loss = total / n
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": n}


def held_out_builtin(train_config: dict) -> list[str]:
    """Built-in records the run never trained on: its own held-out split when it trained on the
    built-in corpus, else freshly generated ones."""
    seed = int(train_config.get("seed", 0))
    data = train_config.get("data", "builtin")
    if data.startswith("builtin"):
        return split_records(load_records(data, seed=seed), seed=seed)[1]
    return load_records("builtin:2000", seed=seed + 1)


def builtin_probes(model, tokenizer, train_config: dict, context: int, max_examples: int) -> list:
    """The ``hz`` and ``type`` probes on the run's held-out built-in records."""
    records = held_out_builtin(train_config)
    return [run_probe(model, tokenizer, records, field, "held-out built-in records", context, max_examples)
            for field in PROBE_FIELDS]
