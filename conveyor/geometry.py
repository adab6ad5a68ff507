"""Rotations, Euler angles and point-group symmetry, in RELION's conventions.

Euler angles
------------
Three angles in degrees, ``rot`` (rlnAngleRot), ``tilt`` (rlnAngleTilt) and ``psi``
(rlnAnglePsi), ZYZ, exactly as RELION's ``Euler_angles2matrix``::

    A = Rz(psi) @ Ry(tilt) @ Rz(rot)

    Rz(a) = [[ cos a,  sin a, 0],        Ry(b) = [[cos b, 0, -sin b],
             [-sin a,  cos a, 0],                  [    0, 1,      0],
             [     0,      0, 1]]                  [sin b, 0,  cos b]]

``A`` maps coordinates of the reference (the 3D map) to coordinates of the particle image:
``r_image = A @ r_map`` with vectors ``(x, y, z)``. The projection of a map ``V`` with
matrix ``A`` is ``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz`` — the map rotated by ``A`` and summed
along z (see :mod:`conveyor.spa.projection`). The viewing direction, in map coordinates,
is the third row of ``A``: ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``
(RELION's ``Euler_angles2direction``). :func:`matrix_to_euler` follows RELION's
``Euler_matrix2angles`` (tilt in [0, 180], rot and psi in (-180, 180]).

Symmetry
--------
:func:`symmetry_matrices` returns the rotation group of a point-group symbol with
RELION's axes (``SymList::fill_symmetry_class``):

* ``Cn``: n-fold axis along z.
* ``Dn``: n-fold along z, 2-fold along x.
* ``T``:  3-fold along z, 2-fold along (0, 0.816496, 0.577350).
* ``O``:  3-fold along (1, 1, 1)/√3, 4-fold along z.
* ``I`` (= ``I2``, RELION's default): 2-fold along z, 5-fold along
  (0.525731, 0, 0.850651), 3-fold along (0, 0.356822, 0.934172) — Crowther's
  convention with 2-folds on x, y and z. ``I1``, ``I3`` and ``I4`` are RELION's other
  settings and are accepted as well.

Group sizes: Cn: n, Dn: 2n, T: 12, O: 24, I: 60. A map ``V`` has the symmetry when
``V(R r) = V(r)`` for every returned ``R``; the set is a group, so it holds ``R`` and
``Rᵀ`` alike.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from .errors import InputError

SYMMETRY_FORMS = "C1, Cn (n >= 1), Dn (n >= 2), T, O, I (= I2), I1, I2, I3 or I4"

_SQ = 1.0 / np.sqrt(3.0)
_PHI = (1.0 + np.sqrt(5.0)) / 2.0
_F5 = 1.0 / np.sqrt(1.0 + _PHI**2)
# (fold, axis) generators per group, RELION's fill_symmetry_class (RELION's decimals written
# exactly where they have a closed form: 0.816496 = sqrt(2/3), 0.525731114 = 1/sqrt(1+phi^2), ...)
_GENERATORS = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, np.sqrt(2.0 / 3.0), _SQ))],
    "O": [(3, (_SQ, _SQ, _SQ)), (4, (0.0, 0.0, 1.0))],
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (_F5, 0.0, _PHI * _F5)), (3, (0.0, _SQ / _PHI, _SQ * _PHI))],
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)), (3, (0.9341723640, 0.3568220765, 0.0))],
    "I3": [(2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}


# --------------------------------------------------------------------------- Euler angles
def euler_to_matrix(rot, tilt, psi):
    """RELION's Euler matrix ``A = Rz(psi) Ry(tilt) Rz(rot)`` (angles in degrees).

    Scalars give one ``(3, 3)`` matrix; arrays of angles (broadcast together) give
    ``(..., 3, 3)``.
    """
    a, b, g = np.broadcast_arrays(*(np.deg2rad(np.asarray(v, dtype=float)) for v in (rot, tilt, psi)))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrix):
    """Euler angles ``(rot, tilt, psi)`` in degrees of rotation matrices ``(..., 3, 3)``.

    Follows RELION's ``Euler_matrix2angles``: tilt in [0, 180]; for tilt 0 (or 180)
    rot is 0 and the in-plane angle goes to psi. Returns three arrays (floats for a
    single matrix).
    """
    m = np.asarray(matrix, dtype=float)
    single = m.ndim == 2
    m = m.reshape(-1, 3, 3)
    eps = np.finfo(np.float32).eps
    abs_sb = np.sqrt(m[:, 0, 2] ** 2 + m[:, 1, 2] ** 2)
    regular = abs_sb > 16 * eps
    gamma = np.arctan2(m[:, 1, 2], -m[:, 0, 2])
    alpha = np.arctan2(m[:, 2, 1], m[:, 2, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_sb = np.where(
            np.abs(np.sin(gamma)) < eps,
            np.sign(-m[:, 0, 2] / np.cos(gamma)),
            np.where(np.sin(gamma) > 0, np.sign(m[:, 1, 2]), -np.sign(m[:, 1, 2])),
        )
    beta = np.arctan2(sign_sb * abs_sb, m[:, 2, 2])
    up = m[:, 2, 2] > 0
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(up, 0.0, np.pi))
    gamma = np.where(
        regular, gamma, np.where(up, np.arctan2(-m[:, 1, 0], m[:, 0, 0]), np.arctan2(m[:, 1, 0], -m[:, 0, 0]))
    )
    rot, tilt, psi = np.rad2deg(alpha), np.rad2deg(beta), np.rad2deg(gamma)
    if single:
        return float(rot[0]), float(tilt[0]), float(psi[0])
    shape = np.asarray(matrix).shape[:-2]
    return rot.reshape(shape), tilt.reshape(shape), psi.reshape(shape)


def viewing_direction(rot, tilt):
    """Unit projection direction in map coordinates (RELION's ``Euler_angles2direction``)."""
    a, b = np.deg2rad(np.asarray(rot, dtype=float)), np.deg2rad(np.asarray(tilt, dtype=float))
    return np.stack([np.sin(b) * np.cos(a), np.sin(b) * np.sin(a), np.cos(b)], axis=-1)


# --------------------------------------------------------------------------- rotations
def rotation_about_axis(axis, angle_deg):
    """Active right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues' formula)."""
    u = np.asarray(axis, dtype=float)
    u = u / np.linalg.norm(u)
    t = np.deg2rad(angle_deg)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * (k @ k)


def quaternion_to_matrix(q):
    """Rotation matrices ``(..., 3, 3)`` of quaternions ``(..., 4)`` ``(w, x, y, z)`` (normalised here)."""
    q = np.asarray(q, dtype=float)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    m = np.empty(q.shape[:-1] + (3, 3))
    m[..., 0, 0] = 1 - 2 * (y * y + z * z)
    m[..., 0, 1] = 2 * (x * y - z * w)
    m[..., 0, 2] = 2 * (x * z + y * w)
    m[..., 1, 0] = 2 * (x * y + z * w)
    m[..., 1, 1] = 1 - 2 * (x * x + z * z)
    m[..., 1, 2] = 2 * (y * z - x * w)
    m[..., 2, 0] = 2 * (x * z - y * w)
    m[..., 2, 1] = 2 * (y * z + x * w)
    m[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return m


def random_rotations(n: int, rng=None):
    """``n`` rotation matrices ``(n, 3, 3)`` drawn uniformly (Haar measure) from SO(3).

    Uses normalised 4D Gaussian vectors as unit quaternions. ``rng`` is a
    ``numpy.random.Generator`` or a seed.
    """
    rng = np.random.default_rng(rng)
    return quaternion_to_matrix(rng.standard_normal((int(n), 4)))


def angular_distance(a, b):
    """Angle in degrees of the rotation ``a bᵀ`` between rotation matrices (broadcast)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    tr = np.einsum("...ij,...ij->...", a, b)  # trace(a @ b.T)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def angular_error(estimated, true, symmetry: str = "C1"):
    """Smallest angle (degrees) between ``estimated`` and ``true @ R`` over the symmetry group.

    A particle with matrix ``A`` of a symmetric map is the same view as ``A @ R`` for every
    symmetry operator ``R`` (RELION's ``Euler_apply_transf`` with ``L = I``).
    """
    est = np.asarray(estimated, dtype=float)
    tru = np.asarray(true, dtype=float)
    ops = symmetry_matrices(symmetry)
    cand = np.einsum("...ij,gjk->...gik", tru, ops)
    return angular_distance(est[..., None, :, :], cand).min(axis=-1)


# --------------------------------------------------------------------------- symmetry
def parse_symmetry(symmetry) -> tuple[str, int]:
    """Validate a point-group symbol; return ``(kind, order)``.

    ``kind`` is ``C``, ``D``, ``T``, ``O`` or one of ``I1``..``I4`` (``I`` becomes ``I2``);
    ``order`` is n for Cn/Dn and 0 otherwise. Raises :class:`InputError` listing the
    allowed forms.
    """
    s = str(symmetry).strip().upper()
    m = re.fullmatch(r"([CD])([1-9][0-9]*)", s)
    if m:
        kind, n = m.group(1), int(m.group(2))
        if kind == "D" and n < 2:
            raise InputError("symmetry", f"{symmetry!r} is not a valid point group (Dn needs n >= 2)",
                             f"use one of {SYMMETRY_FORMS}")
        return kind, n
    if s in ("T", "O"):
        return s, 0
    if s == "I":
        return "I2", 0
    if s in ("I1", "I2", "I3", "I4"):
        return s, 0
    raise InputError("symmetry", f"{symmetry!r} is not a supported point group", f"use one of {SYMMETRY_FORMS}")


def _close_group(gens: list[np.ndarray]) -> np.ndarray:
    """All products of ``gens`` (a finite rotation group), identity first."""
    elems = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                p = g @ a
                if np.abs(np.array(elems) - p).max(axis=(1, 2)).min() > 1e-6:
                    elems.append(p)
                    new.append(p)
        frontier = new
        if len(elems) > 240:  # pragma: no cover - a wrong axis table would loop forever
            raise RuntimeError("symmetry generators do not close to a finite group")
    return np.array(elems)


def _frame(gens) -> np.ndarray:
    """Orthonormal frame (columns) from the first (2-fold) and second (5-fold) generator axes."""
    e1 = np.asarray(gens[0][1], dtype=float)
    e1 /= np.linalg.norm(e1)
    v = np.asarray(gens[1][1], dtype=float)
    e2 = v - (v @ e1) * e1
    e2 /= np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)


@lru_cache(maxsize=64)
def _symmetry_cached(kind: str, n: int) -> np.ndarray:
    if kind == "C":
        out = np.array([rotation_about_axis((0, 0, 1), 360.0 * k / n) for k in range(n)])
    elif kind == "D":
        cn = [rotation_about_axis((0, 0, 1), 360.0 * k / n) for k in range(n)]
        two = rotation_about_axis((1, 0, 0), 180.0)
        out = np.array(cn + [c @ two for c in cn])
    elif kind in ("I1", "I3", "I4"):
        # RELION's decimals for these settings are good to ~1e-7 only; build the group as an
        # exact rotation of I2 that carries I2's 2-fold and 5-fold axes onto this setting's.
        base = _symmetry_cached("I2", 0)
        q = _frame(_GENERATORS[kind]) @ _frame(_GENERATORS["I2"]).T
        out = np.einsum("ij,gjk,lk->gil", q, base, q)
        for fold, ax in _GENERATORS[kind]:  # every listed generator must be in the group
            g = rotation_about_axis(ax, 360.0 / fold)
            if np.abs(out - g).max(axis=(1, 2)).min() > 1e-5:  # pragma: no cover
                raise RuntimeError(f"symmetry table for {kind} is inconsistent")
    else:
        gens = [rotation_about_axis(ax, 360.0 / fold) for fold, ax in _GENERATORS[kind]]
        out = _close_group(gens)
    out[np.abs(out) < 1e-12] = 0.0
    out.setflags(write=False)
    return out


def symmetry_matrices(symmetry: str = "C1") -> np.ndarray:
    """Rotation matrices ``(G, 3, 3)`` of a point group, identity first, RELION's axes.

    ``symmetry``: ``C1``, ``Cn``, ``Dn`` (n >= 2), ``T``, ``O``, ``I`` (= ``I2``), ``I1``..``I4``
    (case-insensitive). See the module docstring for the axes. Raises
    :class:`InputError` for other symbols.
    """
    kind, n = parse_symmetry(symmetry)
    return np.array(_symmetry_cached(kind, n))


def symmetry_order(symmetry: str) -> int:
    """Number of operators of a point group (Cn: n, Dn: 2n, T: 12, O: 24, I: 60)."""
    kind, n = parse_symmetry(symmetry)
    return {"C": n, "D": 2 * n, "T": 12, "O": 24}.get(kind, 60)
