"""Euler angles (RELION's ZYZ), uniform rotations and point-group symmetry operators."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.errors import InputError
from conveyor.geometry import (
    angular_distance,
    angular_error,
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
    rotation_about_axis,
    symmetry_matrices,
    symmetry_order,
    viewing_direction,
)


def _rz(a):
    c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])


def _ry(b):
    c, s = np.cos(np.deg2rad(b)), np.sin(np.deg2rad(b))
    return np.array([[c, 0, -s], [0, 1.0, 0], [s, 0, c]])


def test_euler_matrix_is_relion_zyz():
    rot, tilt, psi = 37.0, 71.0, -122.0
    a = euler_to_matrix(rot, tilt, psi)
    np.testing.assert_allclose(a, _rz(psi) @ _ry(tilt) @ _rz(rot), atol=1e-12)
    # third row is RELION's projection direction
    np.testing.assert_allclose(a[2], viewing_direction(rot, tilt), atol=1e-12)
    # a pure rot about z: A maps the map's +x axis to image direction (cos, -sin)
    np.testing.assert_allclose(euler_to_matrix(90, 0, 0) @ [1, 0, 0], [0, -1, 0], atol=1e-12)


def test_euler_round_trip():
    rng = np.random.default_rng(3)
    rot = rng.uniform(-179, 179, 500)
    tilt = rng.uniform(1, 179, 500)
    psi = rng.uniform(-179, 179, 500)
    r2, t2, p2 = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    np.testing.assert_allclose(r2, rot, atol=1e-8)
    np.testing.assert_allclose(t2, tilt, atol=1e-8)
    np.testing.assert_allclose(p2, psi, atol=1e-8)
    # any rotation matrix comes back to itself
    mats = random_rotations(300, rng)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(mats)), mats, atol=1e-9)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_matrix_to_euler_gimbal_lock(tilt):
    a = euler_to_matrix(25.0, tilt, 40.0)
    rot, t, psi = matrix_to_euler(a)
    assert rot == 0.0 and t == pytest.approx(tilt)
    np.testing.assert_allclose(euler_to_matrix(rot, t, psi), a, atol=1e-9)


def test_random_rotations_orthonormal_and_uniform():
    rng = np.random.default_rng(0)
    r = random_rotations(20000, rng)
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", r, r), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    # Haar measure: E[R] = 0, viewing directions uniform on the sphere (cos tilt uniform)
    assert np.abs(r.mean(axis=0)).max() < 0.02
    cos_tilt = r[:, 2, 2]
    assert abs(cos_tilt.mean()) < 0.02 and abs(cos_tilt.var() - 1 / 3) < 0.01
    # rotation angle density (1 - cos w)/pi: mean angle = pi/2 + 2/pi
    w = np.deg2rad(angular_distance(r, np.eye(3)))
    assert abs(w.mean() - (np.pi / 2 + 2 / np.pi)) < 0.02
    # seeded: same rotations again
    np.testing.assert_array_equal(random_rotations(5, 7), random_rotations(5, np.random.default_rng(7)))


@pytest.mark.parametrize(
    "sym,order", [("C1", 1), ("C2", 2), ("C7", 7), ("D2", 4), ("D3", 6), ("D11", 22), ("T", 12), ("O", 24),
                  ("I", 60), ("I1", 60), ("I3", 60), ("I4", 60), ("d5", 10)]
)
def test_symmetry_group_size_and_closure(sym, order):
    g = symmetry_matrices(sym)
    assert g.shape == (order, 3, 3) and symmetry_order(sym) == order
    np.testing.assert_allclose(g[0], np.eye(3))
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", g, g), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    # closed under products, elements distinct
    prod = np.einsum("aij,bjk->abik", g, g).reshape(-1, 1, 3, 3)
    dist = np.abs(prod - g[None]).max(axis=(2, 3))
    assert dist.min(axis=1).max() < 1e-9
    pair = np.abs(g[:, None] - g[None]).max(axis=(2, 3)) + np.eye(order)
    assert pair.min() > 1e-3


def _contains(g, m):
    return np.abs(g - m).max(axis=(1, 2)).min() < 1e-6


def test_symmetry_axes_follow_relion():
    assert _contains(symmetry_matrices("C4"), rotation_about_axis((0, 0, 1), 90))
    d3 = symmetry_matrices("D3")
    assert _contains(d3, rotation_about_axis((0, 0, 1), 120))
    assert _contains(d3, rotation_about_axis((1, 0, 0), 180))  # 2-fold along x
    t = symmetry_matrices("T")
    assert _contains(t, rotation_about_axis((0, 0, 1), 120))
    assert _contains(t, rotation_about_axis((0, 0.816496, 0.577350), 180))
    o = symmetry_matrices("O")
    assert _contains(o, rotation_about_axis((0, 0, 1), 90)) and _contains(o, rotation_about_axis((1, 1, 1), 120))
    i2 = symmetry_matrices("I")
    for ax in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:  # I2: 2-folds on x, y and z
        assert _contains(i2, rotation_about_axis(ax, 180))
    assert _contains(i2, rotation_about_axis((0.525731114, 0, 0.850650807), 72))
    assert _contains(i2, rotation_about_axis((0, 0.356822076, 0.934172364), 120))
    assert _contains(symmetry_matrices("I3"), rotation_about_axis((0, 0, 1), 72))  # I3: 5-fold on z
    assert _contains(symmetry_matrices("I1"), rotation_about_axis((0.9341723640, 0.3568220765, 0), 120))


@pytest.mark.parametrize("bad", ["D1", "C0", "X3", "", "I5", "C-2", "2"])
def test_symmetry_rejects_bad_symbols(bad):
    with pytest.raises(InputError) as exc:
        symmetry_matrices(bad)
    assert "Dn (n >= 2)" in str(exc.value) and "symmetry" in str(exc.value)


def test_angular_error_with_symmetry():
    rng = np.random.default_rng(1)
    a = random_rotations(10, rng)
    g = symmetry_matrices("D3")
    equiv = a @ g[4]
    assert angular_distance(equiv, a).min() > 10
    np.testing.assert_allclose(angular_error(equiv, a, "D3"), 0.0, atol=1e-5)
    off = a @ rotation_about_axis((0, 1, 0), 7.0)
    np.testing.assert_allclose(angular_error(off, a, "C1"), 7.0, atol=1e-6)
