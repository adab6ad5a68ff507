"""Orientation sampling on SO(3): the refined 600-cell grid, weights, point groups.

Conventions
-----------
* Quaternions are ``(w, x, y, z)``, unit length; ``q`` and ``-q`` are the same rotation,
  so a grid that covers SO(3) once covers half of the unit 3-sphere. Grid quaternions
  are stored with their first non-zero component positive.
* A quaternion is the *active* rotation ``R`` that turns the reference object into its
  orientation in the lab, as in :mod:`conveyor.simulate.spi`; a detector pixel with lab
  vector ``q`` samples the reference intensity at ``Rᵀ q`` (Dragonfly stores the
  conjugate).
* Rotation matrices act on column vectors ``(x, y, z)``.

Grid
----
The 120 vertices of the 600-cell (the unit icosians) tile the 3-sphere with 600 regular
tetrahedra. :func:`quaternion_grid` subdivides every edge into ``num_div`` parts and
takes all lattice points of the subdivision: the vertices, ``num_div - 1`` points inside
every one of the 720 edges, ``(n-1)(n-2)/2`` inside every one of the 1200 faces and
``(n-1)(n-2)(n-3)/6`` inside every one of the 600 cells. The flat points are projected
onto the sphere and the antipodal half is dropped, leaving ``10 (5 n³ + n)`` rotations
(n = 1: 60, 2: 420, 4: 3240, 6: 10 860, 10: 50 100), the grid Dragonfly uses (N.-T. D.
Loh's construction). The mean angle between neighbouring rotations is about
``0.94 / num_div`` rad.

Weights
-------
The projection from a flat cell at distance ``h`` from the origin onto the sphere
stretches volumes by ``h / |v|⁴`` (the gnomonic Jacobian of the 3-sphere) at the flat
point ``v``, and every lattice point of the subdivision stands for the same flat volume,
so each rotation gets weight ``h / |v|⁴`` (normalised to sum 1; the largest is ~1.5x the
smallest). Dragonfly additionally multiplies vertex and edge points by 5/6 and 35/36;
measured against exact integrals of smooth functions on SO(3) (Bingham densities,
Gaussians in the rotation angle) that makes the quadrature 10-100x *less* accurate, so
it is not done here. With these weights smooth functions integrate to ~1e-4 at
``num_div = 4`` where unit weights are off by 1-5 % (``tests/spi/test_quaternions.py``).

Cosets of the cubic group
-------------------------
The 600-cell and its refinement are invariant under multiplication by any unit icosian,
so the grid is also a union of right cosets ``{q ⊗ g}`` of the 12 rotations ``g`` of the
tetrahedral group T (the icosians ``(±1,0,0,0)``..., ``(±½,±½,±½,±½)``): identity,
half-turns about x, y, z and third-turns about the body diagonals, the rotations that
permute the axes of a cubic grid (:func:`coset_decomposition`, :func:`cubic_group_quaternions`).
EMC interpolates once per coset and reads the 12 tomograms off axis-permuted copies of
the model (:mod:`conveyor.spi.emc`).

Friedel symmetry
----------------
A centrosymmetric intensity ``I(q) = I(-q)`` makes orientations ``R`` and ``C₂ R``
(``C₂`` a half-turn about the beam axis) give the same pattern *up to the Ewald-sphere
curvature*: ``C₂`` maps a pixel's ``(q_x, q_y, q_z)`` to ``(-q_x, -q_y, q_z)`` while
``-q`` has ``-q_z``. The 600-cell grid is invariant under ``C₂`` (the quaternion
``(0, 0, 0, 1)`` is an icosian), so ``friedel=True`` keeps one rotation of each pair and
halves the grid exactly; it keeps or drops whole cosets where ``C₂`` maps one coset onto
another (all but 36 of 1620 rotations at ``num_div = 4``). EMC uses the full grid by default (exact on the Ewald sphere)
and enforces Friedel symmetry on the model instead; ``friedel=True`` is a 2x speed-up
that is safe when ``q_z`` is small compared with the speckle size (small scattering
angles).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations, permutations

import numpy as np

from ..errors import InputError

PHI = (1.0 + 5.0**0.5) / 2.0



def num_rotations(num_div: int) -> int:
    """Rotations in :func:`quaternion_grid` for ``num_div``: ``10 (5 n³ + n)``."""
    n = int(num_div)
    return 10 * (5 * n**3 + n)


def neighbour_angle(num_div: int) -> float:
    """Typical rotation angle (rad) between neighbouring grid rotations: ``1.26 / num_div`` (72°/n)."""
    return 0.4 * np.pi / float(num_div)


def covering_angle(num_div: int) -> float:
    """Largest angle (rad) from any rotation to its nearest grid rotation: ``0.91 / num_div`` (measured)."""
    return 0.91 / float(num_div)


# ---------------------------------------------------------------------------------------
# quaternion algebra
# ---------------------------------------------------------------------------------------
from ..geometry import quaternion_to_matrix  # noqa: E402  (one implementation, shared)


def matrix_to_quaternion(m) -> np.ndarray:
    """Quaternions ``[..., 4]`` (first non-zero component positive) of rotation matrices ``[..., 3, 3]``."""
    m = np.asarray(m, dtype=np.float64)
    shape = m.shape[:-2]
    m = m.reshape(-1, 3, 3)
    tr = np.trace(m, axis1=1, axis2=2)
    # four candidate formulas; use the best-conditioned one per matrix
    cand = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    k = np.argmax(cand, axis=-1)
    q = np.empty((m.shape[0], 4))
    for i in range(m.shape[0]):
        a = m[i]
        if k[i] == 0:
            s = np.sqrt(max(1.0 + tr[i], 1e-300)) * 2
            q[i] = [0.25 * s, (a[2, 1] - a[1, 2]) / s, (a[0, 2] - a[2, 0]) / s, (a[1, 0] - a[0, 1]) / s]
        elif k[i] == 1:
            s = np.sqrt(max(1.0 + a[0, 0] - a[1, 1] - a[2, 2], 1e-300)) * 2
            q[i] = [(a[2, 1] - a[1, 2]) / s, 0.25 * s, (a[0, 1] + a[1, 0]) / s, (a[0, 2] + a[2, 0]) / s]
        elif k[i] == 2:
            s = np.sqrt(max(1.0 + a[1, 1] - a[0, 0] - a[2, 2], 1e-300)) * 2
            q[i] = [(a[0, 2] - a[2, 0]) / s, (a[0, 1] + a[1, 0]) / s, 0.25 * s, (a[1, 2] + a[2, 1]) / s]
        else:
            s = np.sqrt(max(1.0 + a[2, 2] - a[0, 0] - a[1, 1], 1e-300)) * 2
            q[i] = [(a[1, 0] - a[0, 1]) / s, (a[0, 2] + a[2, 0]) / s, (a[1, 2] + a[2, 1]) / s, 0.25 * s]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return canonical(q).reshape(shape + (4,))


def multiply(a, b) -> np.ndarray:
    """Hamilton product ``a ⊗ b`` (rotation ``b`` first, then ``a``), broadcasting."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    w1, x1, y1, z1 = np.moveaxis(a, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        -1,
    )


def conjugate(q) -> np.ndarray:
    """Inverse rotation of unit quaternions: ``(w, -x, -y, -z)``."""
    q = np.array(q, dtype=np.float64, copy=True)
    q[..., 1:] *= -1
    return q


def canonical(q, tol: float = 1e-9) -> np.ndarray:
    """``q`` or ``-q``, whichever has its first component with ``|c| > tol`` positive."""
    q = np.array(q, dtype=np.float64, copy=True)
    flat = q.reshape(-1, 4)
    big = np.abs(flat) > tol
    first = np.argmax(big, axis=1)
    sign = np.sign(flat[np.arange(flat.shape[0]), first])
    sign[sign == 0] = 1.0
    flat *= sign[:, None]
    return flat.reshape(q.shape)


def rotation_angle(a, b) -> np.ndarray:
    """Angle (rad) of the rotation taking ``b`` to ``a``: ``2 arccos |a·b|``, broadcasting."""
    d = np.abs(np.sum(np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64), axis=-1))
    return 2.0 * np.arccos(np.clip(d, 0.0, 1.0))


def random_quaternions(n: int, rng=None) -> np.ndarray:
    """``n`` uniformly distributed rotations (Shoemake), canonical sign."""
    rng = np.random.default_rng(rng)
    u1, u2, u3 = rng.random((3, int(n)))
    a, b = np.sqrt(1 - u1), np.sqrt(u1)
    q = np.stack([b * np.cos(2 * np.pi * u3), a * np.sin(2 * np.pi * u2), a * np.cos(2 * np.pi * u2), b * np.sin(2 * np.pi * u3)], -1)
    return canonical(q)


# ---------------------------------------------------------------------------------------
# the 600-cell and its refinement
# ---------------------------------------------------------------------------------------
def _even_permutations():
    perms = []
    for p in permutations(range(4)):
        inv = sum(1 for i in range(4) for j in range(i + 1, 4) if p[i] > p[j])
        if inv % 2 == 0:
            perms.append(p)
    return perms


@lru_cache(maxsize=1)
def cell600():
    """Vertices ``[120, 4]``, edges ``[720, 2]``, faces ``[1200, 3]``, cells ``[600, 4]`` of the 600-cell.

    Vertices are the 120 unit icosians: the 8 permutations of ``(±1, 0, 0, 0)``, the 16
    points ``(±½, ±½, ±½, ±½)`` and the 96 even permutations of ``½ (±φ, ±1, ±1/φ, 0)``.
    """
    verts = []
    for i in range(4):
        for s in (-1.0, 1.0):
            v = np.zeros(4)
            v[i] = s
            verts.append(v)
    for signs in np.ndindex(2, 2, 2, 2):
        verts.append(0.5 * (2 * np.array(signs) - 1.0))
    base = np.array([PHI, 1.0, 1.0 / PHI, 0.0]) / 2.0
    for p in _even_permutations():
        for signs in np.ndindex(2, 2, 2):
            v = base * np.array([2 * signs[0] - 1.0, 2 * signs[1] - 1.0, 2 * signs[2] - 1.0, 1.0])
            verts.append(v[list(p)])
    verts = np.array(verts)
    # drop duplicates from the sign of the zero coordinate (there are none, but be safe)
    _, keep = np.unique(np.round(verts, 9), axis=0, return_index=True)
    verts = verts[np.sort(keep)]
    if verts.shape[0] != 120:
        raise RuntimeError(f"600-cell construction gave {verts.shape[0]} vertices")
    d2 = np.sum((verts[:, None, :] - verts[None, :, :]) ** 2, axis=-1)
    edge2 = 1.0 / PHI**2
    adj = np.abs(d2 - edge2) < 1e-6
    edges = np.argwhere(np.triu(adj))
    nbrs = [set(np.flatnonzero(adj[i])) for i in range(120)]
    faces = sorted({tuple(sorted((i, j, k))) for i, j in edges for k in nbrs[i] & nbrs[j]})
    cells = sorted({tuple(sorted(f + (m,))) for f in faces for m in nbrs[f[0]] & nbrs[f[1]] & nbrs[f[2]]})
    faces, cells = np.array(faces), np.array(cells)
    if (edges.shape[0], faces.shape[0], cells.shape[0]) != (720, 1200, 600):
        raise RuntimeError("600-cell construction failed")
    return verts, edges, faces, cells


def _compositions(n: int, k: int) -> np.ndarray:
    """All ``k``-tuples of positive integers summing to ``n``, ``[m, k]``."""
    if n < k:
        return np.zeros((0, k), dtype=np.int64)
    out = [np.array(c) for c in combinations(range(1, n), k - 1)]
    bars = np.array(out, dtype=np.int64).reshape(-1, k - 1)
    edges_ = np.concatenate([np.zeros((bars.shape[0], 1), dtype=np.int64), bars, np.full((bars.shape[0], 1), n)], axis=1)
    return np.diff(edges_, axis=1)


@lru_cache(maxsize=16)
def _grid(num_div: int, friedel: bool):
    n = int(num_div)
    verts, edges, faces, cells = cell600()
    # distance of a cell's hyperplane from the origin (the same for every cell)
    h = float(np.linalg.norm(verts[cells[0]].mean(axis=0)))
    pts = [verts]
    for simplices, k in ((edges, 2), (faces, 3), (cells, 4)):
        bary = _compositions(n, k) / float(n)  # [m, k]
        if bary.shape[0]:
            pts.append(np.einsum("mk,skd->smd", bary, verts[simplices]).reshape(-1, 4))
    flat = np.concatenate(pts)
    norm = np.linalg.norm(flat, axis=1)
    w = h / norm**4
    q = flat / norm[:, None]
    qc = canonical(q)
    keep = np.all(np.isclose(qc, q, atol=1e-12), axis=1)
    q, w = q[keep], w[keep]
    if q.shape[0] != num_rotations(n):
        raise RuntimeError(f"grid has {q.shape[0]} rotations, expected {num_rotations(n)}")
    if friedel:
        q, w = _friedel_half(q, w)
    w = w / w.sum()
    return q, w


def _lookup(quats, queries) -> np.ndarray:
    """Index in ``quats`` of every rotation in ``queries`` (``[..., 4]``), -1 where absent."""
    scale = 2.0**20  # grid rotations are far more than 1e-6 apart; products agree to ~1e-15
    kq = np.rint(canonical(quats) * scale).astype(np.int64)
    kx = np.rint(canonical(queries).reshape(-1, 4) * scale).astype(np.int64)
    _, inv = np.unique(np.concatenate([kq, kx]), axis=0, return_inverse=True)
    inv = inv.ravel()
    table = np.full(int(inv.max()) + 1, -1, dtype=np.int64)
    table[inv[: len(kq)][::-1]] = np.arange(len(kq))[::-1]  # first occurrence wins
    return table[inv[len(kq):]].reshape(np.shape(queries)[:-1])


def cubic_group_quaternions() -> np.ndarray:
    """The 12 rotations ``[12, 4]`` of the tetrahedral group T (identity first) as quaternions.

    They are the rotations that map a cubic grid centred on a voxel onto itself and that
    are also unit icosians: the identity, the half-turns about x, y and z and the
    third-turns about the body diagonals (quaternions ``(1,0,0,0)``, ``(0,1,0,0)``, ... and
    ``(½, ±½, ±½, ±½)``). Their matrices are signed permutations (:func:`point_group`
    ``"tetrahedral"``, same order).
    """
    return np.rint(2.0 * matrix_to_quaternion(np.rint(_point_group("tetrahedral")))) / 2.0


def coset_decomposition(quats):
    """Split rotations into right cosets ``{R_j G : G ∈ T}`` of the tetrahedral group.

    The refined 600-cell grid is invariant under right multiplication by every unit
    icosian, so it is a union of cosets of the 12 rotations of
    :func:`cubic_group_quaternions`, which permute the axes of a cubic grid: a pixel of
    orientation ``R_j G`` samples ``W(Gᵀ R_jᵀ q)``, the model with its axes permuted at
    the rotated position of orientation ``R_j``. EMC uses this to interpolate once per
    coset instead of once per rotation.

    Returns
    -------
    members : ``[m, 12]`` int64, indices into ``quats`` of ``q_j ⊗ g`` for the 12 group
        elements ``g`` (column 0: the coset's first rotation ``q_j``), one row per coset
        whose 12 rotations are all in ``quats``
    rest : ``[l]`` int64, the rotations of incomplete cosets (any rotation set works)
    """
    q = np.asarray(quats, dtype=np.float64).reshape(-1, 4)
    g = cubic_group_quaternions()
    idx = _lookup(q, multiply(q[:, None, :], g[None, :, :]))
    complete = np.all(idx >= 0, axis=1) & (idx.min(axis=1) == np.arange(len(q)))
    used = np.zeros(len(q), dtype=bool)
    rows = []
    for i in np.flatnonzero(complete):
        m = idx[i]
        if len(np.unique(m)) == len(m) and not used[m].any():
            used[m] = True
            rows.append(m)
    members = np.array(rows, dtype=np.int64).reshape(-1, len(g))
    return members, np.flatnonzero(~used)


def _friedel_half(q, w):
    """Keep one rotation of each pair ``(R, C₂ R)``, ``C₂`` the half-turn about z; weights doubled.

    Whole cosets ``R T`` (:func:`coset_decomposition`) are kept or dropped together where
    ``C₂`` maps a coset onto another one, so the half stays a union of cosets.
    """
    c2 = np.array([0.0, 0.0, 0.0, 1.0])
    j = _lookup(q, multiply(c2, q))
    if np.any(j < 0):
        raise RuntimeError("grid is not closed under the half-turn about the beam axis")
    members, rest = coset_decomposition(q)
    coset = np.arange(q.shape[0])
    coset[members.ravel()] = np.repeat(members[:, 0], members.shape[1])
    ci, cj = coset[np.arange(q.shape[0])], coset[j]
    keep = np.where(ci == cj, np.arange(q.shape[0]) < j, ci < cj)
    return q[keep], 2.0 * w[keep]


def quaternion_grid(num_div: int, friedel: bool = False):
    """Quasi-uniform rotations of the ``num_div``-refined 600-cell and their weights.

    Parameters
    ----------
    num_div : int
        Subdivision of the 600-cell edges (≥ 1); ``10 (5 n³ + n)`` rotations.
    friedel : bool
        Keep only one of each pair ``(R, C₂ R)`` (``C₂``: half-turn about the beam axis
        z), halving the grid; valid for centrosymmetric intensities at small scattering
        angles (see the module docstring).

    Returns
    -------
    quats : ``[N, 4]`` float64 ``(w, x, y, z)``, canonical sign
    weights : ``[N]`` float64, summing to 1 (integration weights on SO(3))
    """
    if int(num_div) != num_div or int(num_div) < 1:
        raise InputError("num_div", f"must be a positive integer, got {num_div}", "use e.g. 4, 6 or 10")
    q, w = _grid(int(num_div), bool(friedel))
    return q.copy(), w.copy()


# ---------------------------------------------------------------------------------------
# point groups
# ---------------------------------------------------------------------------------------
def _axis_rotation(axis, angle) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    return quaternion_to_matrix(np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * axis]))


def _closure(generators) -> np.ndarray:
    group = [np.eye(3)]
    keys = {tuple(np.round(np.eye(3), 6).ravel() + 0.0)}
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                m = h @ g
                k = tuple(np.round(m, 6).ravel() + 0.0)
                if k not in keys:
                    keys.add(k)
                    group.append(m)
                    new.append(m)
        frontier = new
        if len(group) > 200:
            raise RuntimeError("point group did not close")
    return np.array(group)


@lru_cache(maxsize=32)
def _point_group(name: str) -> np.ndarray:
    if name in ("", "none", "c1", "friedel"):
        return np.eye(3)[None]
    if name == "icosahedral":
        # 5-fold axes along (0, ±1, ±φ) and cyclic permutations (the simulator's capsid)
        return _closure([_axis_rotation((0.0, 1.0, PHI), 2 * np.pi / 5), _axis_rotation((1.0, 1.0, 1.0), 2 * np.pi / 3)])
    if name == "octahedral":
        return _closure([_axis_rotation((0.0, 0.0, 1.0), np.pi / 2), _axis_rotation((1.0, 1.0, 1.0), 2 * np.pi / 3)])
    if name == "tetrahedral":
        return _closure([_axis_rotation((0.0, 0.0, 1.0), np.pi), _axis_rotation((1.0, 1.0, 1.0), 2 * np.pi / 3)])
    if name[:1] in ("c", "d") and name[1:].isdigit() and int(name[1:]) >= 1:
        k = int(name[1:])
        gens = [_axis_rotation((0.0, 0.0, 1.0), 2 * np.pi / k)]
        if name[0] == "d":
            gens.append(_axis_rotation((1.0, 0.0, 0.0), np.pi))
        return _closure(gens)
    raise InputError("symmetry", f"unknown point group {name!r}", "use none, icosahedral, octahedral, tetrahedral, cN or dN (axis z; dN 2-fold along x)")


def point_group(name) -> np.ndarray:
    """Rotation matrices ``[g, 3, 3]`` of a point group (identity first).

    ``None``/``"none"``: the identity. ``"icosahedral"`` (60): 5-fold axes along
    ``(0, ±1, ±φ)`` and cyclic permutations, the setting of the simulated capsid
    (:mod:`conveyor.simulate.spi`). ``"octahedral"`` (24) and ``"tetrahedral"`` (12): 4-
    (2-)fold axes along x, y, z. ``"cN"``: N-fold axis along z; ``"dN"``: plus 2-fold along x.
    """
    key = "none" if name is None else str(name).strip().lower()
    return _point_group(key).copy()
