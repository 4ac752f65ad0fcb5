"""Model cards (README.md) that make a pruned model folder ready to share on the hub.

The card's YAML header is huggingface_hub's ModelCardData; the body says what was
done (method, sparsity, pattern, measured sparsity: from the `sparsity_config`
entry the pruning wrote into config.json, so card and config cannot disagree), the
dense and pruned metrics with their protocol when the model was evaluated, where
it came from (commit, experiment, input hashes) and how to load it. Two kinds of
folder: a dense one (transformers' from_pretrained loads it; pruned weights are
stored as zeros) and a packed N:M one (pruning.packing's loader only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .sparsity_record import CONFIG_KEY, read_sparsity_config

CARD_FILE = "README.md"
PAPER = ("Boža, *Fast and Effective Weight Update for Pruned Large Language Models*, TMLR 2024 "
         "([arXiv:2401.02938](https://arxiv.org/abs/2401.02938))")
METHODS = {
    "magnitude": "magnitude pruning (keep the largest |W|), no weight update",
    "wanda": "Wanda (keep the largest |W|·‖X‖ per output row), no weight update",
    "sparsegpt": "SparseGPT (OBS-style column sweep with lazy block updates)",
    "admm": "one Wanda mask, then the ADMM weight update of " + PAPER,
    "admm-grad": "ADMM-Grad: gradual mask selection inside the ADMM weight update of " + PAPER,
}


@dataclass
class CardFacts:
    """What a card states, gathered by its caller (the report stage, the API's save)."""
    source: str                        # what was pruned: an alias, a local directory or a hub id
    calibration: str | None = None     # how the calibration windows were made, one sentence
    evaluation: dict | None = None     # metrics/eval.json: dense and pruned perplexities and protocol
    lineage: dict = field(default_factory=dict)   # label -> value (commit, experiment, input hashes)
    base_model: str | None = None      # a hub id, for the header's base_model


def calibration_sentence(nsamples: int, seqlen: int, seed: int, text: str) -> str:
    """How the calibration windows were cut (pruning.data.calibration_windows), in words."""
    return (f"{nsamples} windows of {seqlen} tokens from {text}, seed {seed} (each from a random document "
            f"longer than the window, at a random offset)")


def _header(facts: CardFacts, sparsity: dict, *, transformers: bool):
    from huggingface_hub import ModelCardData

    tags = ["admm-prune", "pruned", "sparse", sparsity["method"]]
    if sparsity["pattern"] != "unstructured":
        tags += [f"{sparsity['pattern']}-sparsity", "packed" if not transformers else "semi-structured"]
    return ModelCardData(base_model=facts.base_model, library_name="transformers" if transformers else None,
                         pipeline_tag="text-generation", tags=tags)


def _what_was_done(facts: CardFacts, s: dict) -> list[str]:
    measured = s["measured_sparsity"]
    lines = [
        "## What was done",
        "",
        f"- model: `{facts.source}`",
        f"- method: {METHODS.get(s['method'], s['method'])}",
        f"- target sparsity {s['sparsity']:g}, pattern `{s['pattern']}`"
        + (" (some blocks or layers have their own settings)" if s.get("varies_by_layer") else ""),
        f"- options: `{json.dumps(s.get('options', {}), sort_keys=True)}`",
        f"- measured: {s['pruned_layers']} linear layers of the decoder blocks pruned, sparsity "
        f"{measured['mean_over_layers']:.4f} on average (min {measured['min']:.4f}, max {measured['max']:.4f}); "
        "embeddings and lm_head are dense",
        *([f"- calibration: {facts.calibration}"] if facts.calibration else []),
        "",
    ]
    return lines


def _results(ev: dict | None) -> list[str]:
    if not ev:
        return ["## Results", "", "Not evaluated (pruned with the Python API; the pipeline's `evaluate` stage "
                "measures perplexity).", ""]

    def cell(value):
        return "—" if value is None else f"{value:.3f}"

    protocol = ("the full protocol" if ev.get("protocol") == "full"
                else "an evaluation subset, not the papers' full protocol")
    return [
        "## Results",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        f"| WikiText-2 perplexity | {cell(ev.get('dense_wikitext2_ppl'))} | {cell(ev['wikitext2_ppl'])} |",
        f"| C4 perplexity | {cell(ev.get('dense_c4_ppl'))} | {cell(ev['c4_ppl'])} |",
        f"| sparsity of the pruned linear layers | 0 | {ev['sparsity']:.4f} |",
        "",
        f"Protocol: token perplexity exp(mean NLL) on non-overlapping windows of {ev['seqlen']} tokens, batch 1; "
        f"WikiText-2 raw test (lines joined with blank lines): {ev['wikitext2_windows']} windows; C4 validation "
        f"(first 1100 documents joined with spaces): {ev['c4_windows']} windows. This is {protocol}.",
        "",
    ]


def _lineage(facts: CardFacts) -> list[str]:
    if not facts.lineage:
        return []
    return ["## Lineage", "", *(f"- {label}: {value}" for label, value in facts.lineage.items()), ""]


def _card(header, title: str, body: list[str]):
    from huggingface_hub import ModelCard
    return ModelCard(f"---\n{header.to_yaml()}\n---\n\n# {title}\n\n" + "\n".join(body))


def dense_card(facts: CardFacts, sparsity: dict):
    """The card of a folder that transformers' from_pretrained loads."""
    title = f"{facts.source}, {sparsity['method']} at sparsity {sparsity['sparsity']:g} ({sparsity['pattern']})"
    load = [
        "## How to load",
        "",
        "A plain transformers model: the pruned weights are stored as zeros in dense tensors, so the files are "
        "as large as the dense model's and run at its speed.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")',
        "```",
        "",
        f"`config.json` holds the pruning record under `{CONFIG_KEY}`.",
        "",
    ]
    body = [*_what_was_done(facts, sparsity), *_results(facts.evaluation), *_lineage(facts), *load]
    return _card(_header(facts, sparsity, transformers=True), title, body)


def packed_card(facts: CardFacts, sparsity: dict, packing: dict):
    """The card of a packed N:M folder (pruning.packing): only the project's loader reads it."""
    title = f"{facts.source}, {sparsity['method']} {packing['pattern']}, packed ({packing['format']})"
    load = [
        "## How to load",
        "",
        f"The {packing['pattern']} linear weights are stored packed (`{packing['format']}` v{packing['version']}: "
        f"only the kept values and their in-group positions) in `{packing['weights_file']}`, described by the "
        "`sparsity_packing` entry of `config.json`. transformers cannot read this format, so a plain "
        "`from_pretrained` on this folder fails (it finds no `model.safetensors`). Load it with admm-prune's "
        "loader, which unpacks the weights into a regular transformers model:",
        "",
        "```python",
        "from pruning.packing import load_packed_model, load_packed_tokenizer",
        "",
        'model = load_packed_model("<this folder>")          # dtype=..., device=... optional',
        'tokenizer = load_packed_tokenizer("<this folder>")',
        "```",
        "",
        "(`pip install` the admm-prune project for `pruning`; it needs torch, transformers and safetensors.)",
        "",
    ]
    body = [*_what_was_done(facts, sparsity), *_results(facts.evaluation), *_lineage(facts), *load]
    return _card(_header(facts, sparsity, transformers=False), title, body)


def write_card(model_dir: str | Path, facts: CardFacts, packing: dict | None = None) -> Path:
    """Write README.md into a pruned model folder: the dense card, or with `packing`
    (pruning.packing's config entry) the packed one."""
    model_dir = Path(model_dir)
    sparsity = read_sparsity_config(model_dir)
    card = packed_card(facts, sparsity, packing) if packing else dense_card(facts, sparsity)
    card.save(model_dir / CARD_FILE)
    return model_dir / CARD_FILE


def source_facts(record: dict) -> dict:
    """CardFacts' source and base_model from the model stage's source.json: a local
    directory by its name only (its path means nothing on another machine), a hub
    id as the base model."""
    kind = record.get("kind")
    return {"source": Path(record["source"]).name if kind == "local" else record["source"],
            "base_model": record["source"] if kind == "hub" else None}


def hub_base_model(source: str) -> str | None:
    """The hub id of the model that was pruned, when it came from the hub."""
    from pruning.settings import source_kind
    try:
        return source if source_kind(source) == "hub" else None
    except ValueError:  # a local path that has gone away since
        return None
