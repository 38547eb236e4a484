"""Token sampling and KV-cached decoding for RebuiltLLMIntegration.

Sampling follows the usual order: logits / temperature, top-k, then top-p (nucleus) on what is left,
then a draw from a seeded generator (temperature 0 means greedy). Decoding runs the prompt once
(prefill) and then one token at a time against the per-layer key/value cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Sets to -inf every logit outside the top-k and outside the smallest set whose probability
    reaches top_p (the most likely token always stays). logits: [batch, vocab], fp32."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]."""
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompt: list[int], config: SamplingConfig,
                    stop_ids: tuple[int, ...] = (), device: torch.device | str = "cpu") -> Iterator[int]:
    """Yields new token ids one at a time (for streaming), using the model's KV cache."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    max_len = model.config.max_seq_len
    if len(prompt) >= max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len {max_len}")
    generator = torch.Generator().manual_seed(config.seed)
    caches = [{} for _ in range(model.config.n_layers)]
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    logits = model(tokens, kv_caches=caches)[:, -1]
    position = len(prompt)
    for _ in range(min(config.max_new_tokens, max_len - len(prompt))):
        nxt = sample_next(logits, config, generator)
        token = int(nxt[0])
        yield token
        if token in stop_ids or position + 1 >= max_len:
            return
        logits = model(nxt.view(1, 1), kv_caches=caches, position_offset=position)[:, -1]
        position += 1


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, config: SamplingConfig,
                  on_text: Callable[[str], None] | None = None, device: torch.device | str = "cpu") -> str:
    """Generates a continuation of ``prompt``; ``on_text`` receives each decodable piece as it comes."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    out: list[int] = []
    shown = ""
    for token in generate_tokens(model, ids, config, stop_ids=(tokenizer.eos_id,), device=device):
        if token == tokenizer.eos_id:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            on_text(text[len(shown):])
            shown = text
    text = tokenizer.decode(out)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
