"""Multimodal encoders: catalogue records and molecule graphs -> prefix embeddings of the language model.

Each modality becomes ``k`` embeddings of ``d_model`` placed before the token embeddings
(``RebuiltLLMIntegration.forward(tokens, prefix=...)``; in the pipeline the encoders live on stage 0):

- :class:`CatalogueEncoder`: an MLP over (normalised values, missing-value mask) of the catalogue
  features (``astrobio.data.catalogue``);
- :class:`MoleculeGraphEncoder`: a GIN network with bond features (torch-geometric ``GINEConv``), sum and
  mean pooling per graph (one graph per example: its molecules as disconnected parts);
- :class:`MultimodalPrefix`: the enabled modalities side by side, ``[batch, prefix_len, d_model]``. An
  example without a modality (no catalogue value, an empty graph, or the modality absent from the whole
  batch) gets that modality's learned "missing" embeddings, so the prefix length never changes.

:func:`prefix_lm_loss` is the language-model loss over the token positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrobio.data.catalogue import NUM_FEATURES
from astrobio.data.molecules import EDGE_FEATURES, NODE_FEATURES

MODALITIES = ("text", "catalogue", "graph")
PREFIX_MODALITIES = ("catalogue", "graph")
PREFIX_TOKENS = {"catalogue": 2, "graph": 2}  # prefix positions per modality (MultimodalPrefix's defaults)
OUTPUT_INIT_STD = 0.02  # as the token embeddings (ModelConfig.init_std): prefixes start at their scale


def init_output(layer: nn.Linear) -> nn.Linear:
    nn.init.normal_(layer.weight, std=OUTPUT_INIT_STD)
    nn.init.zeros_(layer.bias)
    return layer


class CatalogueEncoder(nn.Module):
    """``(values [B, F], mask [B, F]) -> [B, tokens, d_model]``; missing values enter as 0 with mask 0."""

    def __init__(self, d_model: int, tokens: int = 2, hidden: int = 256, num_features: int = NUM_FEATURES):
        super().__init__()
        self.tokens, self.d_model, self.num_features = tokens, d_model, num_features
        self.net = nn.Sequential(nn.Linear(2 * num_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 init_output(nn.Linear(hidden, tokens * d_model)))

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if values.shape != mask.shape or values.shape[-1] != self.num_features:
            raise ValueError(f"catalogue values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be "
                             f"[batch, {self.num_features}]")
        present = mask.to(values.dtype)
        x = torch.cat((values * present, present), dim=-1)
        return self.net(x).view(-1, self.tokens, self.d_model)


class MoleculeGraphEncoder(nn.Module):
    """A PyG ``Batch`` of ``num_graphs`` graphs -> ``[num_graphs, tokens, d_model]``; an empty graph
    pools to zeros (``MultimodalPrefix`` replaces it by the missing embedding)."""

    def __init__(self, d_model: int, tokens: int = 2, hidden: int = 128, layers: int = 3,
                 node_features: int = NODE_FEATURES, edge_features: int = EDGE_FEATURES):
        super().__init__()
        from torch_geometric.nn import GINEConv

        self.tokens, self.d_model = tokens, d_model
        self.embed = nn.Linear(node_features, hidden)
        self.convs = nn.ModuleList(
            GINEConv(nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)),
                     edge_dim=edge_features, train_eps=True)
            for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.readout = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(),
                                     init_output(nn.Linear(hidden, tokens * d_model)))

    def forward(self, graphs) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool, global_mean_pool

        x = self.embed(graphs.x)
        for conv, norm in zip(self.convs, self.norms):
            x = x + F.silu(norm(conv(x, graphs.edge_index, graphs.edge_attr)))  # residual GIN layer
        size = graphs.num_graphs
        pooled = torch.cat((global_add_pool(x, graphs.batch, size), global_mean_pool(x, graphs.batch, size)), dim=-1)
        return self.readout(pooled).view(-1, self.tokens, self.d_model)


class MultimodalPrefix(nn.Module):
    """The prefix of the enabled modalities (``catalogue``, ``graph``; ``text`` needs no encoder), in
    that order: ``[batch, prefix_len, d_model]``."""

    def __init__(self, d_model: int, modalities=PREFIX_MODALITIES, catalogue_tokens: int = PREFIX_TOKENS["catalogue"],
                 graph_tokens: int = PREFIX_TOKENS["graph"], hidden: int = 256, gnn_hidden: int = 128,
                 gnn_layers: int = 3):
        super().__init__()
        self.modalities = check_modalities(modalities)
        if not self.modalities:
            raise ValueError(f"modalities {modalities!r} name no prefix modality (catalogue, graph); "
                             "text alone needs no MultimodalPrefix")
        self.d_model = d_model
        self.encoders = nn.ModuleDict()
        self.missing = nn.ParameterDict()
        if "catalogue" in self.modalities:
            self.encoders["catalogue"] = CatalogueEncoder(d_model, catalogue_tokens, hidden)
        if "graph" in self.modalities:
            self.encoders["graph"] = MoleculeGraphEncoder(d_model, graph_tokens, gnn_hidden, gnn_layers)
        for name, encoder in self.encoders.items():
            self.missing[name] = nn.Parameter(torch.randn(encoder.tokens, d_model) * OUTPUT_INIT_STD)

    @property
    def prefix_len(self) -> int:
        return sum(encoder.tokens for encoder in self.encoders.values())

    def forward(self, batch_size: int, catalogue_values: torch.Tensor | None = None,
                catalogue_mask: torch.Tensor | None = None, graphs=None) -> torch.Tensor:
        parts = []
        if "catalogue" in self.encoders:
            parts.append(self.catalogue_part(batch_size, catalogue_values, catalogue_mask))
        if "graph" in self.encoders:
            parts.append(self.graph_part(batch_size, graphs))
        return torch.cat(parts, dim=1)

    def catalogue_part(self, batch_size: int, values, mask) -> torch.Tensor:
        if values is None:
            return self.missing["catalogue"].expand(batch_size, -1, -1)
        if mask is None:
            raise ValueError("catalogue values came without their catalogue_mask; pass both (catalogue_features "
                             "returns the pair)")
        check_batch("catalogue values", values.shape[0], batch_size)
        encoded = self.encoders["catalogue"](values, mask)
        return blend(encoded, self.missing["catalogue"], mask.any(dim=-1))

    def graph_part(self, batch_size: int, graphs) -> torch.Tensor:
        if graphs is None:
            return self.missing["graph"].expand(batch_size, -1, -1)
        check_batch("molecule graphs", graphs.num_graphs, batch_size)
        encoded = self.encoders["graph"](graphs)
        present = torch.bincount(graphs.batch, minlength=batch_size) > 0
        return blend(encoded, self.missing["graph"], present)


def blend(encoded: torch.Tensor, missing: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per example: the encoding where the modality is present, else the missing embedding."""
    return torch.where(present[:, None, None], encoded, missing.to(encoded.dtype)[None])


def check_batch(what: str, got: int, batch_size: int) -> None:
    if got != batch_size:
        raise ValueError(f"{what} cover {got} examples but the batch has {batch_size}; give one per example "
                         "(an empty graph or an all-missing mask where an example has none)")


def check_modalities(modalities) -> tuple[str, ...]:
    """The prefix modalities of a ``--modalities`` list (``text`` is implied and dropped)."""
    names = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; choose from {', '.join(MODALITIES)} "
                         "(as --modalities text,catalogue,graph)")
    return tuple(n for n in PREFIX_MODALITIES if n in names)


def prefix_positions(modalities) -> int:
    """The prefix length of ``build_prefix(d_model, modalities)`` with the default sizes, without building it
    (0 for text alone)."""
    return sum(PREFIX_TOKENS[name] for name in check_modalities(modalities))


def build_prefix(d_model: int, modalities, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, **sizes) -> MultimodalPrefix:
    """The prefix module with weights drawn from ``seed`` (the global RNG is left as it was); on
    ``device="meta"`` nothing is allocated (parameter counts for the memory planner)."""
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return MultimodalPrefix(d_model, modalities, **sizes).to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MultimodalPrefix(d_model, modalities, **sizes)
    return module.to(device=device, dtype=dtype)


def prefix_lm_loss(logits: torch.Tensor, targets: torch.Tensor, prefix_len: int,
                   ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of the token positions: logits ``[B, prefix_len + T, V]``, targets ``[B, T]``
    (``ignore_index`` where there is nothing to predict, as padding). Prefix positions predict nothing."""
    if logits.shape[1] != prefix_len + targets.shape[1] or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match a prefix of {prefix_len} before targets "
                         f"{tuple(targets.shape)}: expected [batch, {prefix_len} + {targets.shape[1]}, vocab]")
    token_logits = logits[:, prefix_len:]
    return F.cross_entropy(token_logits.reshape(-1, token_logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index)
