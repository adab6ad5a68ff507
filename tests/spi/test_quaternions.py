"""Orientation grid (refined 600-cell): counts, uniformity, integration weights, point groups."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import hyp1f1

from conveyor.errors import InputError
from conveyor.simulate.spi import icosahedron_vertices
from conveyor.simulate.spi import quaternion_to_matrix as sim_quaternion_to_matrix
from conveyor.spi import quaternions as Q


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_count_is_dragonflys_10_5n3_plus_n(n):
    q, w = Q.quaternion_grid(n)
    assert len(q) == len(w) == 10 * (5 * n**3 + n) == Q.num_rotations(n)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0)
    assert np.allclose(Q.canonical(q), q)  # one of each ±q pair: SO(3) covered once
    assert w.sum() == pytest.approx(1.0) and w.min() > 0
    assert w.max() / w.min() < 1.6


def test_600_cell_structure():
    verts, edges, faces, cells = Q.cell600()
    assert verts.shape == (120, 4) and edges.shape == (720, 2) and faces.shape == (1200, 3) and cells.shape == (600, 4)
    assert np.allclose(np.linalg.norm(verts, axis=1), 1.0)
    # every vertex has 12 neighbours (the icosahedral vertex figure)
    assert np.all(np.bincount(edges.ravel(), minlength=120) == 12)


@pytest.mark.parametrize("n", [2, 4])
def test_uniform_spacing_and_covering(n):
    q, _ = Q.quaternion_grid(n)
    d = Q.rotation_angle(q[:, None], q[None])
    np.fill_diagonal(d, np.inf)
    nn = d.min(axis=1)
    # no duplicates, neighbours 72°/n apart within ±6 %
    assert nn.min() > 0.9 * Q.neighbour_angle(n) and nn.max() < 1.1 * Q.neighbour_angle(n)
    # every rotation lies within the covering angle 0.91/n of a grid rotation
    r = Q.random_quaternions(1500, 7)
    far = np.min(Q.rotation_angle(r[:, None], q[None]), axis=1)
    assert far.max() <= 1.02 * Q.covering_angle(n)
    assert far.mean() == pytest.approx(0.54 / n, rel=0.1)


def test_weights_integrate_smooth_functions_on_so3():
    """Bingham and angle-Gaussian integrals against exact values: weights beat unit weights."""
    q, w = Q.quaternion_grid(4)
    rng = np.random.default_rng(3)
    errs_w, errs_1 = [], []
    for a in rng.normal(size=(10, 4)):
        a /= np.linalg.norm(a)
        f = np.exp(24.0 * (q @ a) ** 2)  # (q·a)² is a function of the rotation (even in q)
        exact = hyp1f1(0.5, 2.0, 24.0)  # mean of exp(κ x1²) on the unit 3-sphere
        errs_w.append(abs(np.sum(w * f) / exact - 1))
        errs_1.append(abs(np.mean(f) / exact - 1))
    assert max(errs_w) < 1e-3 and max(errs_1) > 5 * max(errs_w)
    s = 0.35  # Gaussian in the rotation angle about a random centre; Haar density (1 - cos t)/π
    exact = quad(lambda t: np.exp(-((t / s) ** 2)) * (1 - np.cos(t)) / np.pi, 0, np.pi)[0]
    for c in Q.random_quaternions(5, 4):
        val = np.sum(w * np.exp(-((Q.rotation_angle(q, c) / s) ** 2)))
        assert val == pytest.approx(exact, rel=3e-3)


def test_friedel_half_pairs_rotations_by_a_half_turn_about_the_beam():
    q, w = Q.quaternion_grid(3)
    h, wh = Q.quaternion_grid(3, friedel=True)
    assert len(h) == len(q) // 2 and wh.sum() == pytest.approx(1.0)
    partner = Q.canonical(Q.multiply(np.array([0.0, 0.0, 0.0, 1.0]), h))
    # the partners are the other half: together they rebuild the full grid
    both = np.concatenate([h, partner])
    key = {tuple(np.round(x, 7)) for x in both}
    assert key == {tuple(np.round(x, 7)) for x in q}


def test_conventions_match_the_simulator():
    q = Q.random_quaternions(50, 1)
    assert np.allclose(Q.quaternion_to_matrix(q), sim_quaternion_to_matrix(q))
    assert np.allclose(Q.matrix_to_quaternion(Q.quaternion_to_matrix(q)), q)
    a, b = q[:10], q[10:20]
    assert np.allclose(Q.quaternion_to_matrix(Q.multiply(a, b)), Q.quaternion_to_matrix(a) @ Q.quaternion_to_matrix(b))
    assert np.allclose(Q.rotation_angle(q, q), 0.0, atol=1e-6)


@pytest.mark.parametrize("name,order", [("icosahedral", 60), ("octahedral", 24), ("tetrahedral", 12), ("c5", 5), ("d3", 6), (None, 1)])
def test_point_groups(name, order):
    g = Q.point_group(name)
    assert g.shape == (order, 3, 3)
    assert np.allclose(g @ np.transpose(g, (0, 2, 1)), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(g), 1.0)


def test_icosahedral_group_is_the_simulated_capsids():
    v = icosahedron_vertices()
    for rot in Q.point_group("icosahedral"):
        moved = v @ rot.T
        assert np.min(np.linalg.norm(moved[:, None] - v[None], axis=-1), axis=1).max() < 1e-9


def test_bad_arguments():
    with pytest.raises(InputError):
        Q.quaternion_grid(0)
    with pytest.raises(InputError):
        Q.point_group("q7")
