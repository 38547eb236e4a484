"""Cutting RebuiltLLMIntegration into contiguous pipeline stages.

Stage 0 holds the embedding and the first layers, the last stage the last layers, the final norm and
the head; a stage in between holds layers only. A stage maps its input (token ids on stage 0, hidden
states elsewhere) to its output (hidden states, or logits on the last stage). Parameter names keep the
whole model's names (``layers.7.attn.wq.weight``), so checkpoints move between stage counts.

In a multimodal run the prefix encoders live on stage 0: ``PrefixedStage`` runs them on a batch's
catalogue rows and molecule graphs and puts their embeddings before the tokens, so the hidden states it
sends on are ``prefix_len`` positions longer than the token sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from astrobio.model.transformer import (ModelConfig, RMSNorm, RebuiltLLMIntegration, TransformerBlock,
                                        embed_tokens, head_loss, init_parameters, run_blocks)


def even_split(n_layers: int, num_stages: int) -> list[int]:
    """Layer counts per stage, as even as possible (earlier stages take the remainder)."""
    if num_stages < 1 or num_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {num_stages} stages; use 1..{n_layers} stages")
    base, extra = divmod(n_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]


def check_split(layers_per_stage: list[int], n_layers: int) -> list[int]:
    if sum(layers_per_stage) != n_layers or any(k < 1 for k in layers_per_stage):
        raise ValueError(f"layer split {layers_per_stage} must be positive counts summing to {n_layers}")
    return list(layers_per_stage)


class PipelineStage(nn.Module):
    """One contiguous piece of the model. ``layers`` is a ModuleDict keyed by the global layer index,
    so that parameter names match the whole model's."""

    def __init__(self, config: ModelConfig, stage: int, layers_per_stage: list[int]):
        super().__init__()
        self.config = config
        self.stage = stage
        self.num_stages = len(layers_per_stage)
        self.first_layer = sum(layers_per_stage[:stage])
        self.is_first = stage == 0
        self.is_last = stage == self.num_stages - 1
        if self.is_first:
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleDict({str(self.first_layer + i): TransformerBlock(config)
                                     for i in range(layers_per_stage[stage])})
        if self.is_last:
            self.norm = RMSNorm(config.d_model, config.norm_eps)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.fused = False  # the chunked loss (set with the layers' kernels by use_kernels)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        x = self.run_layers(x, prefix)
        return self.head(self.norm(x)) if self.is_last else x

    def run_layers(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_first:
            x = embed_tokens(self, x, prefix)
        return run_blocks(nn.ModuleList(self.layers.values()), x, self.config, self.gradient_checkpointing)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, prefix: torch.Tensor | None = None,
             ignore_index: int = -100) -> torch.Tensor:
        """The last stage's mean cross-entropy of the token positions (``RebuiltLLMIntegration.loss``),
        without materialising all logits on the fused path."""
        if not self.is_last:
            raise ValueError(f"stage {self.stage} of {self.num_stages} has no head; the loss is the last stage's")
        hidden = self.norm(self.run_layers(x, prefix))
        return head_loss(self.head, hidden[:, hidden.shape[1] - targets.shape[1]:], targets, self.fused,
                         ignore_index)


class PrefixedStage(nn.Module):
    """Stage 0 with the multimodal prefix encoders (``astrobio.model.encoders.MultimodalPrefix``) before it.

    Its input is a batch with ``tokens`` and ``prefix_inputs()`` (``astrobio.data.multimodal.MultimodalBatch``);
    its output the stage's output over prefix + tokens, ``[batch, prefix_len + T, ...]``."""

    def __init__(self, stage: PipelineStage, prefix: nn.Module):
        super().__init__()
        if not stage.is_first:
            raise ValueError(f"the prefix encoders go before stage 0, not stage {stage.stage}")
        self.stage, self.prefix = stage, prefix

    def forward(self, batch) -> torch.Tensor:
        return self.stage(batch.tokens, prefix=self.prefix(**batch.prefix_inputs()))

    def loss(self, batch, targets: torch.Tensor) -> torch.Tensor:
        """A one-stage pipeline's loss (``PipelineStage.loss``) over the token positions."""
        return self.stage.loss(batch.tokens, targets, prefix=self.prefix(**batch.prefix_inputs()))


def build_stage(config: ModelConfig, stage: int, layers_per_stage: list[int] | None = None, seed: int = 0,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                kernels: str = "eager") -> PipelineStage:
    """Builds one stage with the same initial weights the whole model would give those parameters;
    ``kernels`` as in ``build_model``."""
    split = check_split(layers_per_stage or even_split(config.n_layers, 1), config.n_layers)
    if not 0 <= stage < len(split):
        raise ValueError(f"stage {stage} out of range for a {len(split)}-stage split")
    with torch.device("meta"):
        module = PipelineStage(config, stage, split)
    if torch.device(device).type == "meta":
        return module.to(dtype)
    module = module.to_empty(device="cpu").to(torch.float32)
    init_parameters(module, config, seed)
    module = module.to(device=device, dtype=dtype)
    if kernels != "eager":
        from astrobio.model.fast import use_kernels
        use_kernels(module, kernels)
    return module


def split_model(model: RebuiltLLMIntegration, layers_per_stage: list[int]) -> list[PipelineStage]:
    """Stages that share (not copy) the whole model's parameters: for single-process comparisons."""
    config = model.config
    split = check_split(layers_per_stage, config.n_layers)
    stages = []
    for s in range(len(split)):
        with torch.device("meta"):
            stage = PipelineStage(config, s, split)
        if stage.is_first:
            stage.embed = model.embed
        for key in stage.layers:
            stage.layers[key] = model.layers[int(key)]
        if stage.is_last:
            stage.norm, stage.head = model.norm, model.head
        stage.gradient_checkpointing = model.gradient_checkpointing
        stage.fused = model.fused
        stages.append(stage)
    return stages


def stage_state_dict_keys(config: ModelConfig, stage: int, layers_per_stage: list[int]) -> list[str]:
    with torch.device("meta"):
        return list(PipelineStage(config, stage, check_split(layers_per_stage, config.n_layers)).state_dict())
