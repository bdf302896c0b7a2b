"""Report: pattern checks on analyses whose answer is known, and the written files."""
import json
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from hierfast.report import check_patterns, write_report  # noqa: E402
from hierfast.report.patterns import spearman  # noqa: E402

L = 6
LAYERS = [f"conv{i + 1}" for i in range(L)]


def _hierarchy(flip: bool = False) -> dict:
    """An analysis with every pattern built in (or every pattern reversed with flip)."""
    gap = np.abs(np.subtract.outer(np.arange(L), np.arange(L)))
    cka = np.exp(-gap / 2.0) if not flip else 1.0 - 0.9 * np.exp(-gap / 2.0) * (gap > 0)
    rising = np.linspace(0.3, 0.95, L)
    diag = np.linspace(0.95, 0.3, L)
    ref = np.full((L, L), 0.2)
    np.fill_diagonal(ref, diag[::-1] if flip else diag)
    return {
        "layers": LAYERS,
        "cka": cka,
        "cka_vs_reference": ref,
        "reference_name": "initialisation",
        "invariance": {"translate": {"magnitudes": [0.0, 1.0, 3.0],
                                    "score": np.stack([np.ones(L), rising[::-1] if flip else rising,
                                                       (rising[::-1] if flip else rising) / 2])}},
        "probe": {"accuracy": rising[::-1] if flip else rising, "control": np.full(L, 0.1),
                  "selectivity": (rising[::-1] if flip else rising) - 0.1, "chance": 0.1},
        "dimension": {"twonn": np.linspace(8, 4, L), "twonn_sd": np.full(L, 0.3),
                      "participation_ratio": np.linspace(20, 5, L)},
        "sparsity": np.linspace(0.5, 0.2, L),
        "meta": {"model": "synthetic"},
    }


def test_patterns_hold_on_a_built_in_hierarchy():
    verdicts = {p["name"]: p["holds"] for p in check_patterns(_hierarchy())}
    assert verdicts == {"probe_rises_with_depth": True, "translation_invariance_rises": True,
                        "adjacent_layers_more_similar": True, "training_changes_upper_layers": True}


def test_patterns_fail_on_the_reversed_hierarchy():
    verdicts = {p["name"]: p["holds"] for p in check_patterns(_hierarchy(flip=True))}
    assert not any(verdicts.values())


def test_unmeasured_patterns_are_reported_as_such():
    out = check_patterns({"layers": LAYERS})
    assert [p["holds"] for p in out] == [None] * 4
    assert all(p["evidence"] == "not measured" for p in out)


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([2, 2, 2]) == 0.0


def test_write_report_is_self_contained(tmp_path):
    res = write_report(_hierarchy(), tmp_path / "out", intro="synthetic")
    text = open(res["html"], encoding="utf-8").read()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    srcs = re.findall(r"src='([^']*)'", text)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text  # nothing fetched when opened
    assert text.count("class='yes'") == 4
    for p in res["figures"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(res["json"]))
    assert saved["analysis"]["layers"] == LAYERS
    np.testing.assert_allclose(saved["analysis"]["cka"], _hierarchy()["cka"])
    assert [p["holds"] for p in saved["patterns"]] == [True] * 4


def test_a_failed_pattern_is_shown_not_hidden(tmp_path):
    res = write_report(_hierarchy(flip=True), tmp_path)
    text = open(res["html"], encoding="utf-8").read()
    assert text.count("class='no'>does not hold") == 4


@pytest.mark.parametrize("bad, match", [
    ({"layers": []}, "non-empty"),
    ({"layers": LAYERS, "cka": np.zeros((2, 2))}, r"analysis\['cka'\] must be \(6, 6\)"),
    ({"layers": LAYERS, "probe": {"accuracy": [0.5]}}, r"analysis\['probe'\]\['accuracy'\] must have 6"),
    ({"layers": LAYERS, "invariance": {"t": {"magnitudes": [1, 2], "score": np.zeros((1, 6))}}},
     r"\(2 magnitudes, 6 layers\)"),
])
def test_bad_analysis_names_the_key(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        write_report(bad, tmp_path)


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="choose a writable directory"):
        write_report({"layers": LAYERS}, f / "sub")


def _browser():
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_a_headless_browser(tmp_path):
    """The HTML renders in a real browser: the screenshot is as tall as the page asks and not blank."""
    import subprocess

    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome on PATH (Debian: apt-get install chromium); HTML rendering not checked")
    res = write_report(_hierarchy(), tmp_path)
    shot = tmp_path / "shot.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1000,1400", f"file://{res['html']}"],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))
    assert img.shape[:2] == (1400, 1000)
    # rendered text and figures: many distinct colours, and plenty of non-white pixels
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 50
    assert (rgb.min(axis=1) < 200).mean() > 0.02


def test_invariance_families_named_a_and_b_are_not_taken_for_compare_to(tmp_path):
    """from_results used to guess compare_to output from a dict with an "a" key."""
    import torch
    from torch import nn

    import hierfast
    from hierfast.report.schema import from_results
    from hierfast.transforms import GaussianNoise

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = [torch.randn(8, 1, 6, 6) for _ in range(2)]
    stats = {"invariance": {"transforms": {"a": [GaussianNoise(0.1)], "b": [GaussianNoise(0.3)]}}, "sparsity": {}}
    res = hierfast.analyze(net, data, stats=stats, progress=False)
    a = from_results(res)
    assert set(a["invariance"]) == {"a", "b"} and a["invariance"]["b"]["magnitudes"] == [0.3]
    assert write_report(a, tmp_path / "one")["html"]
    pair = hierfast.analyze(net, data, stats=stats, compare_to=net, progress=False)
    b = from_results(pair)
    assert set(b["invariance"]) == {"a", "b"}  # the analysed model's families, not {"a": side a}
    torch.testing.assert_close(torch.as_tensor(b["invariance"]["a"]["score"], dtype=torch.float64), res.invariance["a"]["score"])
    torch.testing.assert_close(torch.as_tensor(b["sparsity"], dtype=torch.float64), res.sparsity)
    assert write_report(b, tmp_path / "two")["html"]


def test_nan_from_constant_layers_is_left_out_or_undefined_never_failed(tmp_path):
    """A constant layer has NaN CKA and invariance (legal input): its entries are left out of the
    means; a verdict with nothing left to decide on is undefined (holds None), not "does not hold"."""
    a = _hierarchy()
    cka = np.array(a["cka"], dtype=float)
    cka[4, :] = cka[:, 4] = np.nan  # conv5 constant
    a["cka"] = cka
    out = {p["name"]: p for p in check_patterns(a)}["adjacent_layers_more_similar"]
    defined = [(i, j) for i in range(L) for j in range(L) if 4 not in (i, j)]
    adjacent = np.mean([cka[i, j] for i, j in defined if abs(i - j) == 1])
    distant = np.mean([cka[i, j] for i, j in defined if abs(i - j) >= 2])
    assert out["holds"] is True and "conv5" in out["evidence"] and "nan" not in out["evidence"]
    assert out["values"] == {"adjacent": pytest.approx(adjacent), "distant": pytest.approx(distant)}

    b = _hierarchy()
    few = np.array(b["cka"], dtype=float)
    few[2:, :] = few[:, 2:] = np.nan  # only conv1, conv2 defined: no pair two apart
    b["cka"] = few
    score = np.array(b["invariance"]["translate"]["score"], dtype=float)
    score[1, -2:] = np.nan  # the whole top third of the smallest magnitude is undefined
    b["invariance"]["translate"]["score"] = score
    got = {p["name"]: p for p in check_patterns(b)}
    for name, bad in (("adjacent_layers_more_similar", LAYERS[2:]), ("translation_invariance_rises", LAYERS[-2:])):
        assert got[name]["holds"] is None and got[name]["undefined"] == bad, got[name]
        assert "undefined" in got[name]["evidence"] and all(n in got[name]["evidence"] for n in bad)
    html = open(write_report(b, tmp_path)["html"], encoding="utf-8").read()
    rows = re.findall(r"<tr><td>(.*?)</td><td class='(\w+)'>(.*?)</td>", html)
    verdicts = {stmt: (cls, word) for stmt, cls, word in rows}
    assert verdicts["Adjacent layers are more similar (CKA) than distant ones."] == ("na", "undefined")


def test_results_json_is_strict_and_reads_back_nan(tmp_path):
    """NaN used to be written as a bare NaN literal (not JSON); now null, read back as NaN."""
    from hierfast.report.schema import as_array

    a = _hierarchy()
    cka = np.array(a["cka"], dtype=float)
    cka[0, :] = cka[:, 0] = np.nan
    a["cka"] = cka
    write_report(a, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    np.testing.assert_array_equal(as_array(saved["analysis"]["cka"]), cka)  # NaN where NaN, values elsewhere
    assert saved["analysis"]["cka"][0][0] is None
    assert check_patterns(saved["analysis"]) == json.loads(json.dumps(check_patterns(a)))


def _spearman_reference(v):
    """Pearson correlation of the average ranks of the finite values with their depth order."""
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    ranks = np.array([np.mean([j for j, u in enumerate(sorted(v)) if u == x]) for x in v])
    return float(np.corrcoef(np.arange(v.size), ranks)[0, 1])


def test_nan_probe_accuracy_is_left_out_never_a_holds():
    acc = [0.50, 0.45, 0.40, np.nan, np.nan, 0.51]
    assert spearman(acc) == pytest.approx(_spearman_reference(acc))  # 0.2: NaN used to rank as the highest
    a = _hierarchy()
    a["probe"]["accuracy"] = np.array(acc)
    out = {p["name"]: p for p in check_patterns(a)}["probe_rises_with_depth"]
    assert out["holds"] is False and "conv4" in out["evidence"] and "conv5" in out["evidence"]
    assert out["values"]["spearman"] == pytest.approx(0.2)
    a["probe"]["accuracy"] = np.array([np.nan] * 5 + [0.5])  # one defined value: nothing to decide on
    out = {p["name"]: p for p in check_patterns(a)}["probe_rises_with_depth"]
    assert out["holds"] is None and out["undefined"] == LAYERS[:5]
    assert np.isnan(spearman([np.nan, 1.0]))


def test_unknown_transform_magnitude_is_no_undefined_verdict():
    a = _hierarchy()
    a["invariance"] = {"translate": {"magnitudes": [float("nan")], "score": np.linspace(0.3, 0.9, L)[None]}}
    out = {p["name"]: p for p in check_patterns(a)}["translation_invariance_rises"]
    assert out["holds"] is True and "magnitude not given" in out["evidence"] and "[]" not in out["evidence"]


def test_meta_of_any_type_is_written_and_json_comes_with_the_html(tmp_path):
    from pathlib import Path

    a = _hierarchy()
    a["meta"] = {"path": Path("/x"), "count": np.int64(7), "flag": np.bool_(True), "dtype": np.dtype("float32"),
                 "acc": np.float32(0.5)}
    res = write_report(a, tmp_path / "out")
    meta = json.load(open(res["json"], encoding="utf-8"))["analysis"]["meta"]
    assert meta == {"path": str(Path("/x")), "count": 7, "flag": True, "dtype": "float32", "acc": 0.5}
    assert type(meta["count"]) is int
    a["meta"] = {"bad": float("nan")}  # NaN becomes null: still strict JSON
    res = write_report(a, tmp_path / "out2")
    assert json.load(open(res["json"], encoding="utf-8"))["analysis"]["meta"] == {"bad": None}


def test_html_is_not_written_when_the_json_cannot_be(tmp_path, monkeypatch):
    import hierfast.report.html as H

    def boom(v):
        raise TypeError("not serialisable")

    monkeypatch.setattr(H, "_json_ready", boom)
    with pytest.raises(TypeError):
        write_report(_hierarchy(), tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


def test_dollar_signs_in_names_are_drawn_literally(tmp_path):
    from hierfast.report import figures

    names = [f"cost${i}\\q$" if i % 2 else f"l{i}" for i in range(L)]
    a = _hierarchy()
    a["layers"] = names
    a["invariance"] = {"a$b$": a["invariance"]["translate"]}
    a["reference_name"] = "$init$"
    write_report(a, tmp_path / "out")  # used to raise ParseFatalException while drawing
    for fig in (figures.cka_heatmap(a["cka"], names, title="$t$"), figures.invariance_curves(names, a["invariance"]),
                figures.depth_curves(names, {"$s$": np.ones(L)}, ylabel="y", title="t")):
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend()
        texts = list(ax.get_xticklabels()) + [ax.title] + (list(legend.get_texts()) if legend else [])
        shown = [t._preprocess_math(t.get_text()) for t in texts]
        assert all(not ismath for _, ismath in shown)
        assert [s for s, _ in shown[:L]] == names


def test_sparsity_length_is_checked_and_the_caption_names_both_scores(tmp_path):
    a = _hierarchy()
    a["sparsity"] = np.ones(L - 1)
    with pytest.raises(ValueError, match="sparsity"):
        write_report(a, tmp_path / "out")
    text = open(write_report(_hierarchy(), tmp_path / "ok")["html"], encoding="utf-8").read()
    assert "f(Tx) − f(T′x)" in text and "f(Tx) − f(x)‖" in text  # two-view and one-view


def test_probe_over_a_single_layer_is_undefined_for_too_few_layers():
    a = {"layers": LAYERS[:1], "probe": {"accuracy": np.array([0.7]), "control": np.array([0.1]),
                                         "selectivity": np.array([0.6]), "chance": 0.1}}
    out = {p["name"]: p for p in check_patterns(a)}["probe_rises_with_depth"]
    assert out["holds"] is None and out["undefined"] == []
    # was: "not finite for layers [] (constant features?)" although every value is finite
    assert "1 layer(s) with a defined value, too few to decide; too few layers" in out["evidence"]
    assert "constant" not in out["evidence"] and "[]" not in out["evidence"]
