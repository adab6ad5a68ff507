"""Class selection (conveyor.spa.select, conveyor.spa.selector_training) and the class2d/select commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import format_image_name, optics_table, read_particles, read_star, write_star
from conveyor.spa import select as sl
from conveyor.spa.selector_training import features_of, model_pool, simulate_class_set, simulate_particle_stack, train_selector


# --------------------------------------------------------------------------- the trained selector
def test_selector_accuracy_on_held_out_simulated_classes():
    """Classifications simulated from other specimens and another seed than the training set (seed 0, 16 specimens)."""
    model = sl.load_model()
    classes = simulate_class_set(200, seed=20261, models=model_pool(3, 777))
    feats = features_of(classes)
    p = model.predict_proba(feats[list(model.features)].to_numpy(float))
    labels = np.array([c.label for c in classes])
    kinds = np.array([c.kind for c in classes])
    boxes = np.array([c.average.shape[-1] for c in classes])
    accuracy = np.mean((p >= 0.5) == labels)
    by_kind = {k: np.mean((p[kinds == k] >= 0.5) == labels[kinds == k]) for k in set(kinds)}
    assert accuracy >= 0.95, by_kind
    assert set(kinds) >= {"particle", "ice", "carbon", "aggregate", "empty", "off_centre", "contamination", "junk_mix"}
    # first-round boxes (bin 4: 16-32 px) as well as the larger ones
    small = boxes <= 32
    assert small.sum() >= 50 and (~small).sum() >= 50
    assert np.mean((p[small] >= 0.5) == labels[small]) >= 0.93


def test_features_are_scale_free():
    """The same classes imaged at 4x the pixel size with 4x the mask (same px) and 7x the density in noise units
    (another dose, detector, binning): identical features; only the relative density of a class changes them."""
    rng = np.random.default_rng(3)
    b = 32
    yy, xx = np.mgrid[:b, :b] - b // 2
    protein = [np.exp(-((xx - dx) ** 2 + (yy / 0.7) ** 2) / (2 * 4.0**2)) + 0.05 * rng.standard_normal((b, b))
               for dx in (0, 1, -1)]
    ice = 4.0 * (np.hypot(xx, yy) < 8)
    avg = np.stack(protein + [ice])
    counts, res = [120, 80, 60, 10], [9.0, 10.0, 9.5, 12.0]
    a = sl.class_features(avg, counts, res, 2.0, 40.0)
    b4 = sl.class_features(7.0 * avg, counts, 4 * np.array(res), 8.0, 160.0)
    pd.testing.assert_frame_equal(a, b4, atol=1e-9)
    assert abs(a.contrast_rel[1]) < 0.1 and a.contrast_rel[4] > 1.0
    # the reference is the particle-weighted median: a class with no particles does not move it
    c = sl.class_features(np.concatenate([avg, 50.0 * avg[:1]]), counts + [0], res + [9.0], 2.0, 40.0)
    assert np.allclose(c.contrast_rel.iloc[:4], a.contrast_rel)


def test_stored_model_is_portable_json():
    d = json.loads(sl.DEFAULT_MODEL.read_text())
    assert d["format"] == "conveyor-class-selector" and d["features"] == list(sl.FEATURES)
    assert d["training"]["command"].startswith("conveyor spa train-selector")
    assert sl.DEFAULT_MODEL.stat().st_size < 2_000_000


def test_tree_model_reproduces_sklearn_and_round_trips():
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, len(sl.FEATURES)))
    y = (x[:, 0] + 0.5 * x[:, 3] ** 2 - x[:, 7] > 0.3).astype(int)
    clf = GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0).fit(x, y)
    model = sl.SelectorModel.from_sklearn(clf, sl.FEATURES)
    again = sl.SelectorModel.from_dict(json.loads(json.dumps(model.to_dict())))
    xt = rng.standard_normal((50, len(sl.FEATURES)))
    assert np.allclose(again.predict_proba(xt), clf.predict_proba(xt)[:, 1], atol=1e-9)
    with pytest.raises(InputError, match="not a Conveyor class-selector"):
        sl.SelectorModel.from_dict({"format": "other"})


def test_features_respond_to_what_they_describe():
    b, ps, d = 64, 2.0, 80.0  # mask radius 20 px
    yy, xx = np.mgrid[:b, :b] - b // 2
    blob = np.exp(-(xx**2 + (yy / 0.6) ** 2) / (2 * 8.0**2))
    off = np.roll(blob, 9, axis=1)
    edge = np.where(xx > 3, 1.0, 0.0) * (np.hypot(xx, yy) < 20)
    f = sl.class_features(np.stack([blob, off, edge]), [100, 100, 100], [10.0, 10.0, 10.0], ps, d)
    assert f.com_offset[2] > 5 * f.com_offset[1]
    assert f.anisotropy[3] > 0.8 > f.anisotropy[1]
    assert f.roundness[1] > f.roundness[3]


# --------------------------------------------------------------------------- manual selection
def test_manual_selection_checks_class_numbers(tmp_path):
    assert sl.check_class_numbers([4, 1, 4], 6) == [1, 4]
    with pytest.raises(InputError, match=r"class\(es\) 9 do not exist.*valid class numbers are 1\.\.6"):
        sl.check_class_numbers([1, 9], 6)
    p = tmp_path / "round1.yaml"
    p.write_text(sl.selection_yaml([1, 4, 7], comment="test"))
    assert yaml.safe_load(p.read_text()) == {"classes": [1, 4, 7]}
    assert sl.read_selection(p, 8) == [1, 4, 7]
    with pytest.raises(InputError, match="1..6"):
        sl.read_selection(p, 6)
    p.write_text("classes: one\n")
    with pytest.raises(InputError, match="whole number"):
        sl.read_selection(p, 6)
    with pytest.raises(InputError, match="does not exist"):
        sl.read_selection(tmp_path / "missing.yaml", 6)
    sel = sl.select_classes(np.random.default_rng(0).standard_normal((6, 32, 32)), np.full(6, 10), np.full(6, 20.0),
                            4.0, 100.0, mode="manual", manual_classes=[2, 5])
    assert sel.selected == [2, 5] and sel.scores.selected.sum() == 2


def test_misfit_outliers_flag_only_the_far_tail():
    rng = np.random.default_rng(1)
    classes = np.repeat([1, 2], 100)
    misfit = rng.standard_normal(200)
    misfit[:5] += 12.0  # junk sitting in class 1
    out = sl.misfit_outliers(classes, misfit, 3.5)
    assert out[:5].all() and out[5:].sum() <= 1
    assert not sl.misfit_outliers(classes, misfit, 0).any()


# --------------------------------------------------------------------------- commands
def write_particle_star(d, images, ctf, pixel_size):
    """``d/particles.star`` and its stack as an extraction writes them; rlnCoordinateX is the image index."""
    n, box = images.shape[0], images.shape[-1]
    write_mrc(d / "mic1.mrcs", images, pixel_size, volume=False)
    parts = pd.DataFrame({"rlnImageName": [format_image_name(i + 1, "mic1.mrcs") for i in range(n)],
                          "rlnMicrographName": "mic1.mrc", "rlnCoordinateX": np.arange(float(n)), "rlnCoordinateY": 5.0,
                          **{c: ctf[c].to_numpy() for c in ctf.columns}, "rlnOpticsGroup": 1})
    optics = optics_table("opticsGroup1", pixel_size / 2, 300.0, 2.7, 0.1, image_size=box, image_pixel_size=pixel_size)
    write_star(d / "particles.star", {"optics": optics, "particles": parts})
    return d / "particles.star"


@pytest.fixture(scope="module")
def particle_star(tmp_path_factory):
    """60 particles (two views and 12 ice balls) as an extraction would write them."""
    images, ctf, truth, _ = simulate_particle_stack(n=60, box=32, pixel_size=4.0, particle_diameter=80.0,
                                                     symmetry="C2", n_views=2, junk_fraction=0.2, junk_kinds=("ice",),
                                                     seed=11)
    return write_particle_star(tmp_path_factory.mktemp("particles"), images, ctf, 4.0)


# --------------------------------------------------------------------------- particle level, through the commands
@pytest.mark.parametrize("box, pixel, n, classes, iterations, junk_fraction, seed", [
    (20, 12.0, 450, 24, 12, 0.25, 5),  # first round: bin-4 boxes, many classes, all kinds of junk
    (40, 6.0, 240, 10, 10, 0.1, 6),  # second round: bin 2, fewer classes, the junk mostly gone
], ids=["round1_bin4", "round2_bin2"])
def test_auto_selection_keeps_true_particles_and_removes_junk(tmp_path, box, pixel, n, classes, iterations, junk_fraction,
                                                                seed):
    """A 150-Å D3 particle at random views with ice, contamination, carbon edges, aggregates, empty and off-centre
    picks (and neighbours in 15 % of the boxes) through ``spa class2d`` and ``spa select --mode auto``."""
    images, ctf, truth, _ = simulate_particle_stack(n=n, box=box, pixel_size=pixel, particle_diameter=150.0,
                                                     symmetry="D3", n_views=None, junk_fraction=junk_fraction,
                                                     neighbour_fraction=0.15, seed=seed)
    star = write_particle_star(tmp_path, images, ctf, pixel)
    out = tmp_path / "class2d"
    assert main(["spa", "class2d", "--particles", str(star), "--out-dir", str(out), "--classes", str(classes),
                 "--iterations", str(iterations), "--psi-step", "10", "--offset-range", str(box // 8),
                 "--particle-diameter", "150"]) == 0
    assert main(["spa", "select", "--class-dir", str(out), "--mode", "auto", "--out-particles", str(tmp_path / "sel.star")]) == 0
    chosen, _ = read_particles(tmp_path / "sel.star")
    kept = np.isin(np.arange(n), chosen.rlnCoordinateX.to_numpy().astype(int))
    junk = truth.is_junk.to_numpy() == 1
    assert kept[~junk].mean() >= 0.9, kept[~junk].mean()
    assert 1.0 - kept[junk].mean() >= 0.8, 1.0 - kept[junk].mean()


def test_class2d_select_round_trip(particle_star, tmp_path, capsys):
    out = tmp_path / "results" / "exp" / "spa" / "class2d" / "round1"
    rc = main(["spa", "class2d", "--particles", str(particle_star), "--out-dir", str(out), "--classes", "3",
               "--iterations", "4", "--psi-step", "30", "--offset-range", "2", "--particle-diameter", "100"])
    assert rc == 0
    for name in ("class_averages.mrcs", "model.star", "particles.star", "gallery.png", "log.csv"):
        assert (out / name).exists(), name
    avg, ps = read_mrc(out / "class_averages.mrcs")
    assert avg.shape == (3, 32, 32) and ps == pytest.approx(4.0)
    model = read_star(out / "model.star")
    mc = model["model_classes"]
    assert list(mc.rlnReferenceImage.str.split("@").str[0].astype(int)) == [1, 2, 3]
    assert mc.rlnClassDistribution.sum() == pytest.approx(1.0, abs=1e-4)
    assert {"model_general", "model_class_1", "model_optics_group_1"} <= set(model)
    parts, optics = read_particles(out / "particles.star")
    assert len(parts) == 60 and "rlnCoordinateX" in parts and "rlnImagePixelSize" in optics
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution",
                "rlnLogLikeliContribution", "cvMisfit"):
        assert col in parts, col
    assert list(np.bincount(parts.rlnClassNumber, minlength=4)[1:]) == list(mc.cvClassParticles)
    assert len(pd.read_csv(out / "log.csv")) == 4

    # auto selection writes particles, the YAML and the scores
    sel_yaml = tmp_path / "results" / "exp" / "spa" / "select" / "round1.yaml"
    rc = main(["spa", "select", "--class-dir", str(out), "--mode", "auto", "--out-particles", str(tmp_path / "sel.star"),
               "--out-yaml", str(sel_yaml), "--out-scores", str(tmp_path / "scores.csv"),
               "--out-gallery", str(tmp_path / "chosen.png"), "--threshold", "0.0"])
    assert rc == 0
    chosen = yaml.safe_load(sel_yaml.read_text())["classes"]
    assert chosen == [1, 2, 3]
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores["class"]) == [1, 2, 3] and set(sl.FEATURES) <= set(scores.columns)
    sel_parts, sel_optics = read_particles(tmp_path / "sel.star")
    assert 0 < len(sel_parts) <= 60 and len(sel_optics) == 1

    # manual mode without a selection: exit 3 and say what to look at and what to write
    capsys.readouterr()
    rc = main(["spa", "select", "--class-dir", str(out), "--mode", "manual", "--out-particles", str(tmp_path / "m.star")])
    err = capsys.readouterr().err
    assert rc == 3
    assert str(out / "gallery.png") in err and str(sel_yaml) in err
    assert "classes: [1, 4, 7]" in err and "conveyor select spa" in err
    assert not (tmp_path / "m.star").exists()

    # conveyor select spa checks the numbers and writes the default roundN.yaml
    rc = main(["select", "spa", "--class-dir", str(out), "--classes", "2", "9"])
    assert rc == 2
    assert "valid class numbers are 1..3" in capsys.readouterr().err
    rc = main(["select", "spa", "--class-dir", str(out), "--classes", "2", "1"])
    assert rc == 0 and yaml.safe_load(sel_yaml.read_text()) == {"classes": [1, 2]}
    rc = main(["spa", "select", "--class-dir", str(out), "--mode", "manual", "--selection", str(sel_yaml),
               "--out-particles", str(tmp_path / "m.star")])
    assert rc == 0
    m_parts, _ = read_particles(tmp_path / "m.star")
    assert set(m_parts.rlnClassNumber) <= {1, 2} and len(m_parts) == int(mc.cvClassParticles[:2].sum())


def test_class2d_reports_bad_input(particle_star, tmp_path, capsys):
    rc = main(["spa", "class2d", "--particles", str(particle_star), "--out-dir", str(tmp_path / "c"), "--classes", "40",
               "--particle-diameter", "100"])
    assert rc == 2 and "too few" in capsys.readouterr().err
    rc = main(["spa", "select", "--class-dir", str(tmp_path / "nope"), "--mode", "auto", "--out-particles",
               str(tmp_path / "x.star")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_train_selector_is_reproducible(tmp_path):
    a = train_selector(n=24, seed=3, n_models=1)
    rc = main(["spa", "train-selector", "--out", str(tmp_path / "sel.json"), "--n", "24", "--seed", "3", "--models", "1"])
    assert rc == 0
    m = sl.load_model(tmp_path / "sel.json")
    assert m.trees == a["trees"] and m.features == sl.FEATURES


def test_manual_selection_needs_no_model(tmp_path):
    avg = np.random.default_rng(0).standard_normal((4, 32, 32))
    sel = sl.select_classes(avg, np.full(4, 10), np.full(4, 20.0), 4.0, 100.0, mode="manual", manual_classes=[3],
                            model=tmp_path / "missing.json")
    assert sel.selected == [3] and sel.scores.score.isna().all()
    with pytest.raises(InputError, match="model not found"):
        sl.select_classes(avg, np.full(4, 10), np.full(4, 20.0), 4.0, 100.0, mode="auto", model=tmp_path / "missing.json")
