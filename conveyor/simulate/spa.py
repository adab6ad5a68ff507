"""Cryo-EM single-particle movies with known ground truth.

What is simulated
-----------------
* **Specimen.** A protein-like model (:func:`make_model`): compact domains packed with
  right-handed α-helices (one Gaussian blob per residue, 1.5 Å rise, 100° per residue,
  helix axes ≥ 9 Å apart) joined by loops, the rest of each domain filled with coil
  residues at protein density, with the point-group symmetry imposed exactly
  (every asymmetric-unit residue is copied by every operator of
  :func:`conveyor.geometry.symmetry_matrices`) and an overall diameter ≈ the particle
  diameter. Its Coulomb potential over vitreous ice is ``PROTEIN_POTENTIAL`` (2.3 V) per
  residue volume (136 Å³). The truth map is this potential sampled on the simulation grid
  (volts). Particle images are the *exact* line integrals of the same Gaussians (no
  interpolation), so the map and the particles agree to sampling accuracy.
* **Image formation** (weak-phase approximation, per micrograph):
  phase ``φ = σ_e · ∫V dz`` (σ_e = interaction constant of the voltage);
  ``I = A(x, y) · (1 + 2 · IFT[E(k) · Σ_layers CTF(k; Δf + dz) · FT φ_layer])`` where
  ``CTF`` is :func:`conveyor.spa.ctfmodel.ctf_2d` (so protein is dark at underfocus),
  ``E = exp(-B k²/4)`` a smooth envelope, layers are particle heights in the ice (each
  particle's defocus is recorded) and three ice layers; ``A`` holds amplitude contrast of
  junk (dark ice balls, contamination), the carbon film and a smooth ice-thickness
  variation. ``I`` is scaled to mean 1 over the image, so ``dose_per_frame`` is the mean
  fluence on the detector.
* **Ice.** Amorphous-ice phase noise (power proportional to the thickness, shaped by a
  coarse structure factor of water: weak at low resolution, rising to the 3.7 Å ring) in
  three layers through the ice; it carries the Thon rings of every micrograph.
* **Junk** (``junk_fraction``): ``round(junk_fraction × particles)`` objects per micrograph
  — aggregates (3–6 overlapping particles), dark ice balls and irregular contamination —
  plus a carbon edge (thicker, darker, stronger phase noise, a Fresnel fringe at the edge)
  covering 10–30% of ``round(micrographs × min(1, 2.5 × junk_fraction))`` micrographs;
  those hold proportionally fewer particles and junk (they sit in the hole). Particles and
  junk do not overlap; particle centres are at least radius + 10% of the diameter from
  the image edges.
* **Movie.** The clean image is computed once per micrograph on a canvas larger than the
  frame; frame ``f`` is the canvas Fourier-shifted by the drift ``s_f`` (content moves by
  ``+s_f``; frame 1 has ``s = 0`` and is the reference frame of all coordinates), low-passed
  by radiation damage (Grant & Grigorieff 2015 critical exposure at the accumulated
  dose), optionally deformed locally, cropped, and Poisson-sampled with mean
  ``dose_per_frame · pixel_size² · I`` counts per pixel.

Truth files (``DIR/truth``)
---------------------------
* ``map.mrc`` — the specimen potential (V) on the simulation grid, centre at ``N // 2``.
* ``micrographs.star`` (block ``micrographs``): ``rlnMicrographMovieName``,
  ``rlnMicrographName``, ``rlnDefocusU``, ``rlnDefocusV`` (Å), ``rlnDefocusAngle`` (deg),
  ``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``,
  ``rlnMicrographPixelSize``, ``rlnMicrographDoseRate`` (e/Å²/frame), ``rlnCtfBfactor``,
  ``cvIceThickness`` (Å), ``cvHasCarbon`` (0/1), ``cvCarbonEdgeX``, ``cvCarbonEdgeY``,
  ``cvCarbonNormalAngle`` (a point on the carbon edge, px, and the direction in degrees from
  +x, counter-clockwise, that points into the carbon), ``cvDriftLength`` (px).
* ``shifts.star`` (block ``shifts``): ``rlnMicrographName``, ``rlnMicrographFrameNumber``
  (1-based), ``rlnMicrographShiftX``, ``rlnMicrographShiftY`` (px): the content of frame f
  is displaced by ``+(shift)`` relative to the reference (frame 1, shift 0); aligning
  applies ``-shift``.
* ``particles.star`` (block ``particles``): ``rlnMicrographName``, ``rlnCoordinateX``,
  ``rlnCoordinateY`` (px, 0-based column/row of the object centre in the reference
  frame; the map's centre voxel ``N // 2`` projects exactly there), ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` (0 for junk),
  ``rlnDefocusU``, ``rlnDefocusV``, ``rlnDefocusAngle`` (per particle, with its height),
  ``cvIsJunk`` (0/1), ``cvJunkType`` (``particle``, ``aggregate``, ``ice``,
  ``contamination``), ``cvRadius`` (px).
* ``local_motion.star`` (only when ``local_motion > 0``): per micrograph the coefficients
  of the local deformation (see :func:`local_deformation`).
* ``simulation.yaml`` — every parameter used.

All micrograph names are the movie path relative to ``DIR`` (``movies/mic_0001.mrc``);
match on the file stem. ``DIR/experiment.yaml`` holds the ``spa:`` config section for the
data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .. import backend
from ..errors import InputError
from ..geometry import matrix_to_euler, parse_symmetry, random_rotations, symmetry_matrices
from ..io.atomic import atomic_path, write_text
from ..io.mrc import write_mrc
from ..io.star import write_star
from ..spa.ctfmodel import ctf_2d, electron_wavelength
from ..spa.projection import fft_module

log = logging.getLogger(__name__)

PROTEIN_POTENTIAL = 2.3  # V, Coulomb potential of protein over vitreous ice
RESIDUE_VOLUME = 136.0  # Å³ per residue (110 Da at 0.81 Da/Å³)
RESIDUE_SIGMA = 1.5  # Å, Gaussian width of one residue blob
HELIX_RISE, HELIX_TWIST, HELIX_RADIUS = 1.5, 100.0, 2.3  # Å, degrees, Å
HELIX_SPACING = 9.0  # Å, closest approach of helix axes
COIL_SPACING = 4.6  # Å, closest approach of coil residues (≈ 136 Å³ per residue when packed)
# Phase-noise power of vitreous ice per Å of thickness (rad² Å² / Å): water molecules
# (0.0334 /Å³, ~135 V·Å³ of potential each) with a structure factor S(k) from 0.06 (low k)
# to 1 near the 3.7 Å ring: 0.0334 · 135² · σ_e² ≈ 2.6e-4 · S(k) at 300 kV.
ICE_NOISE_PSD = 2.6e-4


# =========================================================================== parameters
@dataclasses.dataclass
class SpaSimParams:
    """Parameters of :func:`simulate_spa` (units: px, Å, e/Å², kV, mm)."""

    micrographs: int = 4
    size: int = 1024
    frames: int = 20
    pixel_size: float = 1.5
    dose_per_frame: float = 1.2
    particles: int = 40
    particle_diameter: float = 150.0
    symmetry: str = "D3"
    junk_fraction: float = 0.1
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    format: str = "mrc"
    seed: int = 0
    defocus_range: tuple = (8000.0, 25000.0)  # mean defocus, Å
    max_astigmatism: float = 1000.0  # |ΔU - ΔV|, Å
    bfactor_range: tuple = (30.0, 90.0)  # envelope B, Å²
    drift_range: tuple = (3.0, 20.0)  # path length of the whole movie, px
    local_motion: float = 0.0  # largest local displacement at the last frame, px (0: off)
    ice_thickness: float | None = None  # Å; default particle_diameter + 100
    ice_noise: float = 1.0  # scale of the ice phase-noise power
    contrast: float = 1.0  # scale of the protein potential (1: physical)
    radiation_damage: bool = True
    mrc_mode: str = "int16"  # int16 or float32 counts in MRC movies

    def validate(self) -> "SpaSimParams":
        def bad(key, problem, fix):
            raise InputError(f"simulate spa --{key.replace('_', '-')}", problem, fix)

        for key in ("micrographs", "size", "frames"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}", "pass a positive integer")
        if self.size < 64:
            bad("size", f"{self.size} px is too small", "use at least 64 px (1024 is typical)")
        for key in ("pixel_size", "dose_per_frame", "particle_diameter", "voltage"):
            if not float(getattr(self, key)) > 0:
                bad(key, f"must be positive, got {getattr(self, key)}", "pass a positive number")
        if self.particles < 0:
            bad("particles", f"must be >= 0, got {self.particles}", "pass 0 or more")
        if not 0.0 <= self.junk_fraction <= 1.0:
            bad("junk_fraction", f"must be within 0..1, got {self.junk_fraction}", "pass e.g. 0.1")
        if not 0.0 <= self.amplitude_contrast < 1.0:
            bad("amplitude_contrast", f"must be within 0..1, got {self.amplitude_contrast}", "pass e.g. 0.1")
        if self.cs < 0:
            bad("cs", f"must be >= 0, got {self.cs}", "pass the spherical aberration in mm, e.g. 2.7")
        if self.format not in ("mrc", "tiff"):
            bad("format", f"unknown movie format {self.format!r}", "use mrc or tiff")
        if self.mrc_mode not in ("int16", "float32"):
            bad("mrc_mode", f"unknown MRC mode {self.mrc_mode!r}", "use int16 or float32")
        parse_symmetry(self.symmetry)
        d_px = self.particle_diameter / self.pixel_size
        if d_px < 8:
            bad("particle_diameter", f"{self.particle_diameter} Å is only {d_px:.1f} px",
                "use a smaller pixel size or a larger particle (at least 8 px across)")
        if d_px > self.size / 2.5:
            bad("particle_diameter", f"{self.particle_diameter} Å ({d_px:.0f} px) does not fit a {self.size}-px micrograph",
                "increase --size or --pixel-size, or decrease --particle-diameter")
        return self

    @property
    def thickness(self) -> float:
        return float(self.ice_thickness) if self.ice_thickness else float(self.particle_diameter) + 100.0


# =========================================================================== small helpers
def good_size(n: int) -> int:
    """Smallest even integer >= n with no prime factor above 5 (fast FFT size)."""
    n = max(2, int(math.ceil(n)))
    while True:
        if n % 2 == 0:
            m = n
            for p in (2, 3, 5):
                while m % p == 0:
                    m //= p
            if m == 1:
                return n
        n += 1


def map_box_size(particle_diameter: float, pixel_size: float) -> int:
    """Box (px) of the truth map: a fast FFT size >= 1.2 × (diameter + 10 Å) / pixel size."""
    return good_size(1.2 * (particle_diameter + 10.0) / pixel_size)


def interaction_constant(voltage_kv: float) -> float:
    """σ_e in rad/(V·Å): phase shift per volt-ångström of projected potential (0.000653 at 300 kV)."""
    mc2 = 510998.95  # eV
    v = voltage_kv * 1e3
    lam = electron_wavelength(voltage_kv)
    return 2.0 * np.pi / (lam * v) * (mc2 + v) / (2.0 * mc2 + v)


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _random_unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _splat_2d(canvas, xs, ys, sigma_px, amp, chunk=60000):
    """Add Gaussians ``amp · exp(-d²/2σ²)`` at pixel positions (xs, ys) to ``canvas`` (in place)."""
    h, w = canvas.shape
    k = int(math.ceil(3.5 * sigma_px))
    off = np.arange(-k, k + 1)
    flat_out = canvas.reshape(-1)
    for s in range(0, len(xs), chunk):
        x = np.asarray(xs[s:s + chunk], dtype=np.float64)
        y = np.asarray(ys[s:s + chunk], dtype=np.float64)
        a = np.broadcast_to(np.asarray(amp, dtype=np.float64), np.shape(xs))[s:s + chunk]
        ix = np.rint(x).astype(np.int64)[:, None] + off
        iy = np.rint(y).astype(np.int64)[:, None] + off
        gx = np.exp(-((ix - x[:, None]) ** 2) / (2 * sigma_px**2)) * ((ix >= 0) & (ix < w))
        gy = np.exp(-((iy - y[:, None]) ** 2) / (2 * sigma_px**2)) * ((iy >= 0) & (iy < h))
        vals = (a[:, None, None] * gy[:, :, None] * gx[:, None, :]).ravel()
        idx = (np.clip(iy, 0, h - 1)[:, :, None] * w + np.clip(ix, 0, w - 1)[:, None, :]).ravel()
        flat_out += np.bincount(idx, weights=vals, minlength=h * w).astype(canvas.dtype)
    return canvas


def _splat_3d(vol, pts, sigma_px, amp, chunk=20000):
    """Add 3D Gaussians at voxel positions ``pts`` (x, y, z) to ``vol`` [z, y, x] (in place)."""
    n = vol.shape[0]
    k = int(math.ceil(3.5 * sigma_px))
    off = np.arange(-k, k + 1)
    flat = vol.reshape(-1)
    for s in range(0, len(pts), chunk):
        p = pts[s:s + chunk]
        gs, idx = [], []
        for ax in range(3):
            i = np.rint(p[:, ax]).astype(np.int64)[:, None] + off
            g = np.exp(-((i - p[:, ax:ax + 1]) ** 2) / (2 * sigma_px**2)) * ((i >= 0) & (i < n))
            gs.append(g)
            idx.append(np.clip(i, 0, n - 1))
        vals = amp * gs[2][:, :, None, None] * gs[1][:, None, :, None] * gs[0][:, None, None, :]
        lin = (idx[2][:, :, None, None] * n + idx[1][:, None, :, None]) * n + idx[0][:, None, None, :]
        flat += np.bincount(lin.ravel(), weights=vals.ravel(), minlength=n**3).astype(vol.dtype)
    return vol


# =========================================================================== specimen model
@dataclasses.dataclass
class ProteinModel:
    """A symmetric protein-like specimen: Gaussian residue blobs.

    ``positions`` (n, 3) in Å (x, y, z) about the symmetry centre; each blob integrates to
    ``weight`` V·Å³ with width ``sigma`` Å.
    """

    positions: np.ndarray
    sigma: float = RESIDUE_SIGMA
    weight: float = PROTEIN_POTENTIAL * RESIDUE_VOLUME
    symmetry: str = "C1"
    diameter: float = 0.0

    def _sigma_px(self, pixel_size):
        # never narrower than 0.8 px, so the sampled map is not aliased
        return max(self.sigma / pixel_size, 0.8)

    def volume(self, box: int, pixel_size: float) -> np.ndarray:
        """The potential (V) sampled on a ``box³`` grid of ``pixel_size`` Å, centre at ``box // 2``."""
        s = self._sigma_px(pixel_size)
        vol = np.zeros((box, box, box), dtype=np.float64)
        amp = self.weight / ((2 * np.pi) ** 1.5 * (s * pixel_size) ** 3)
        _splat_3d(vol, self.positions / pixel_size + box // 2, s, amp)
        return vol.astype(np.float32)

    def splat_projection(self, canvas, rotation, x: float, y: float, pixel_size: float, scale: float = 1.0):
        """Add the projected potential (V·Å, times ``scale``) seen with ``rotation`` centred at (x, y) px."""
        s = self._sigma_px(pixel_size)
        q = self.positions @ np.asarray(rotation, dtype=float).T
        amp = scale * self.weight / (2 * np.pi * (s * pixel_size) ** 2)
        return _splat_2d(canvas, q[:, 0] / pixel_size + x, q[:, 1] / pixel_size + y, s, amp)

    def projection(self, rotation, box: int, pixel_size: float, shift=(0.0, 0.0)) -> np.ndarray:
        """Exact projected potential (V·Å) in a ``box²`` image, map centre at ``box // 2 + shift``."""
        img = np.zeros((box, box), dtype=np.float64)
        self.splat_projection(img, rotation, box // 2 + shift[0], box // 2 + shift[1], pixel_size)
        return img.astype(np.float32)


def _helix(start, u, n_res, phase):
    e1 = np.cross(u, [0.0, 0.0, 1.0] if abs(u[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(u, e1)  # (e1, e2, u) right-handed
    i = np.arange(n_res)
    th = phase + np.deg2rad(HELIX_TWIST) * i
    return start + (i * HELIX_RISE)[:, None] * u + HELIX_RADIUS * (np.cos(th)[:, None] * e1 + np.sin(th)[:, None] * e2)


def make_model(particle_diameter: float = 150.0, symmetry: str = "C1", rng=None,
               domains_per_asu: int | None = None, fill: float = 0.35) -> ProteinModel:
    """Build a protein-like :class:`ProteinModel` of about ``particle_diameter`` Å with ``symmetry``.

    Domains (balls of radius ``r_dom`` filled with α-helices) are placed one by one, each in
    contact with the ones before, with all symmetry copies kept apart; ``fill`` is the
    fraction of the particle's sphere taken by domains.
    """
    from scipy.spatial import cKDTree  # noqa: PLC0415

    rng = _rng(rng)
    ops = symmetry_matrices(symmetry)
    g = len(ops)
    big_r = particle_diameter / 2.0 - 3.0
    k = domains_per_asu or (4 if g == 1 else int(rng.integers(2, 4)))
    r_dom = float(np.clip(big_r * (fill / (g * k)) ** (1 / 3), 8.0, 45.0))
    r_max = big_r - r_dom
    sep, contact = 1.6 * r_dom, 2.3 * r_dom

    def copies(p):
        return np.einsum("gij,...j->...gi", ops, p)

    centres, placed = [], np.zeros((0, 3))
    for d in range(k):
        cand = _random_unit(rng, 4000) * (rng.uniform(0, 1, (4000, 1)) ** (1 / 3) * r_max)
        if d == 0:
            cand = _random_unit(rng, 4000) * rng.uniform(0.8, 1.0, (4000, 1)) * r_max
        cc = copies(cand)  # (n, g, 3)
        ok = np.ones(len(cand), bool)
        if g > 1:
            dd = np.linalg.norm(cc[:, 1:] - cand[:, None], axis=-1).min(axis=1)
            ok &= dd >= sep
            if d == 0:
                ok &= dd <= contact  # the copies of the first domain touch: one connected particle
        if len(placed):
            pt = cKDTree(placed)
            ok &= pt.query(cc.reshape(-1, 3), k=1)[0].reshape(len(cand), g).min(axis=1) >= sep
            ok &= pt.query(cand, k=1)[0] <= contact
        if not ok.any():
            if d == 0:  # relax contact for awkward groups
                ok = np.ones(len(cand), bool)
                if g > 1:
                    ok = np.linalg.norm(cc[:, 1:] - cand[:, None], axis=-1).min(axis=1) >= sep
            if not ok.any():
                break
        c = cand[np.flatnonzero(ok)[0]]
        centres.append(c)
        placed = np.vstack([placed, copies(c)])

    # helices inside each domain (bundles, mostly along one axis per domain);
    # clash checks against all symmetry copies
    axis_pts = np.zeros((0, 3))  # all copies of all helix axes, in ``tree``
    recent = np.zeros((0, 3))  # copies added since the tree was last built
    tree = None
    domain_helices = []
    for c in centres:
        helices = []
        bundle = _random_unit(rng, 1)[0]
        fails = 0
        while fails < 150:
            p0 = c + _random_unit(rng, 1)[0] * r_dom * rng.uniform(0, 0.8) ** (1 / 3)
            if rng.uniform() < 0.75:
                u = bundle * rng.choice([-1.0, 1.0]) + 0.3 * rng.standard_normal(3)
                u /= np.linalg.norm(u)
            else:
                u = _random_unit(rng, 1)[0]
            length = rng.uniform(10.0, max(12.0, 1.8 * r_dom))
            # keep the axis inside the domain ball
            b = (p0 - c) @ u
            disc = b * b - ((p0 - c) @ (p0 - c) - r_dom**2)
            if disc <= 0:
                fails += 1
                continue
            t_lo, t_hi = max(-length / 2, -b - np.sqrt(disc)), min(length / 2, -b + np.sqrt(disc))
            if t_hi - t_lo < 9.0:
                fails += 1
                continue
            ts = np.arange(t_lo, t_hi + 1e-9, HELIX_RISE)
            seg = p0 + ts[:, None] * u
            segc = copies(seg).reshape(-1, 3)
            if g > 1:
                own = copies(seg)  # (n, g, 3)
                dmin = np.linalg.norm(own[:, None, 1:, :] - seg[None, :, None, :], axis=-1).min()
                if dmin < HELIX_SPACING:
                    fails += 1
                    continue
            if tree is not None and tree.query(segc, k=1, distance_upper_bound=HELIX_SPACING)[0].min() < HELIX_SPACING:
                fails += 1
                continue
            if len(recent) and (np.linalg.norm(segc[:, None] - recent[None], axis=-1) < HELIX_SPACING).any():
                fails += 1
                continue
            helices.append((seg[0], u, len(ts)))
            recent = np.vstack([recent, segc])
            if len(recent) > 400:
                axis_pts = np.vstack([axis_pts, recent])
                recent = np.zeros((0, 3))
                tree = cKDTree(axis_pts)
            fails = 0
        domain_helices.append(helices)
    axis_pts = np.vstack([axis_pts, recent])
    tree = cKDTree(axis_pts) if len(axis_pts) else None

    # residues: helices joined in order by loops of 3.8 Å steps
    residues = []
    for helices in domain_helices:
        prev_end = None
        for start, u, n_res in helices:
            h = _helix(start, u, n_res, rng.uniform(0, 2 * np.pi))
            if prev_end is not None:
                gap = np.linalg.norm(h[0] - prev_end)
                if 4.0 < gap < 30.0:
                    n_loop = int(gap // 3.8)
                    t = (np.arange(1, n_loop + 1) / (n_loop + 1))[:, None]
                    loop = prev_end + t * (h[0] - prev_end) + rng.normal(0, 1.2, (n_loop, 3)) * np.sin(np.pi * t)
                    dmin = tree.query(copies(loop).reshape(-1, 3), k=1)[0].reshape(n_loop, g).min(axis=1)
                    residues.append(loop[dmin > 4.0])
            residues.append(h)
            prev_end = h[-1]

    # coil: fill the rest of each domain with residues at protein density (random sequential
    # packing, >= COIL_SPACING apart), each domain kept to its own Voronoi cell among all copies
    fixed = copies(np.vstack(residues)).reshape(-1, 3) if residues else np.zeros((0, 3))
    fixed_tree = cKDTree(fixed) if len(fixed) else None
    for d, c in enumerate(centres):
        n_cand = int(3.0 * (4 / 3) * np.pi * r_dom**3 / RESIDUE_VOLUME)
        cand = c + _random_unit(rng, n_cand) * (r_dom * rng.uniform(0, 1, (n_cand, 1)) ** (1 / 3))
        own = cKDTree(placed).query(cand, k=1)[1] == d * g
        cand = cand[own]
        if tree is not None and len(cand):
            cand = cand[tree.query(cand, k=1)[0] >= 5.0]
        if fixed_tree is not None and len(cand):
            cand = cand[fixed_tree.query(cand, k=1)[0] >= COIL_SPACING]
        if not len(cand):
            continue
        nbrs = cKDTree(cand).query_ball_point(cand, COIL_SPACING)
        blocked = np.zeros(len(cand), bool)
        keep = np.zeros(len(cand), bool)
        for i in range(len(cand)):
            if not blocked[i]:
                keep[i] = True
                blocked[nbrs[i]] = True
        residues.append(cand[keep])
    asu = np.vstack(residues) if residues else np.zeros((1, 3))
    pos = copies(asu).transpose(1, 0, 2).reshape(-1, 3)  # operator-major: g copies of the ASU
    return ProteinModel(positions=pos, symmetry=str(symmetry), diameter=float(particle_diameter))


def make_map(box: int, pixel_size: float, particle_diameter: float = 150.0, symmetry: str = "C1",
             rng=None) -> np.ndarray:
    """The truth map (V, float32 ``[box]³``) of a protein-like specimen (see :func:`make_model`)."""
    return make_model(particle_diameter, symmetry, rng).volume(box, pixel_size)


# =========================================================================== motion
def drift_trajectory(n_frames: int, rng=None, total=(3.0, 20.0)) -> np.ndarray:
    """Smooth whole-frame drift ``(n_frames, 2)`` of ``(dx, dy)`` px, frame 1 at ``(0, 0)``.

    Beam-induced motion: fast at first and slowing down (exponential decay) on top of a
    steady stage drift, with a slowly turning direction. The path length is uniform in
    ``total`` (px).
    """
    rng = _rng(rng)
    n = int(n_frames)
    if n < 2:
        return np.zeros((max(n, 1), 2))
    length = rng.uniform(*total) if np.ndim(total) else float(total)
    t = np.arange(n - 1, dtype=float)
    speed = np.exp(-t / (rng.uniform(0.15, 0.5) * n)) + rng.uniform(0.1, 0.4)
    turn = np.cumsum(rng.normal(0.0, 0.15, n - 1))
    kern = np.exp(-0.5 * (np.arange(-3, 4) / 1.5) ** 2)
    turn = np.convolve(np.pad(turn, 3, mode="edge"), kern / kern.sum(), mode="valid")
    theta = rng.uniform(0, 2 * np.pi) + turn
    steps = speed[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    steps *= length / np.linalg.norm(steps, axis=1).sum()
    return np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def local_deformation(coeffs, shape, frame_fraction):
    """Local displacement field ``(dx, dy)`` px at a fraction ``t`` (0..1) of the exposure.

    ``d(x, y, t) = t · Σ_j c_j · b_j(u, v)`` with ``u = x / nx - 0.5``, ``v = y / ny - 0.5`` and
    basis ``b = (u, v, u², u·v, v²)``; ``coeffs`` is ``(2, 5)`` (rows for dx and dy). Content
    at reference position p appears at ``p + s_f + d(p, t_f)`` in frame f.
    """
    ny, nx = shape
    v, u = np.meshgrid(np.arange(ny) / ny - 0.5, np.arange(nx) / nx - 0.5, indexing="ij")
    basis = np.stack([u, v, u * u, u * v, v * v])
    c = np.asarray(coeffs, dtype=float)
    return frame_fraction * np.tensordot(c[0], basis, 1), frame_fraction * np.tensordot(c[1], basis, 1)


def critical_exposure(k, voltage: float = 300.0):
    """Grant & Grigorieff (2015) critical exposure (e/Å²) at spatial frequency k (1/Å); ×0.8 at 200 kV."""
    xp = backend.array_module(k)
    kk = xp.maximum(k, 1e-6)
    ne = 0.245 * kk ** (-1.665) + 2.81
    return ne * (0.8 if voltage < 250 else 1.0)


# =========================================================================== placement
def place_objects(shape, radii, rng=None, margin=None, gap: float = 2.0, allowed=None,
                  existing=None) -> np.ndarray:
    """Non-overlapping centres ``(n, 2)`` (x, y px) for discs of ``radii`` (placed largest first).

    Each centre is at least ``margin[i]`` (default: its radius) from the image edge and at
    least ``r_i + r_j + gap`` from every other; ``allowed(x, y, r) -> bool array`` can forbid
    regions (e.g. carbon). ``existing`` is an optional ``(m, 3)`` array of (x, y, r) already
    placed. The clearance to every placed disc is tracked on a grid of at most 384²
    cells and new centres are drawn among the cells with room, so dense layouts (half the
    area covered) still place. Raises :class:`InputError` when the objects do not fit.
    """
    rng = _rng(rng)
    ny, nx = shape
    radii = np.asarray(radii, dtype=float)
    margin = radii if margin is None else np.broadcast_to(np.asarray(margin, dtype=float), radii.shape)
    placed = np.zeros((0, 3)) if existing is None else np.asarray(existing, dtype=float).reshape(-1, 3)
    scale = max(1.0, max(ny, nx) / 384.0)
    gh, gw = int(np.ceil(ny / scale)), int(np.ceil(nx / scale))
    cy, cx = (np.arange(gh) + 0.5) * scale, (np.arange(gw) + 0.5) * scale
    gyy, gxx = np.meshgrid(cy, cx, indexing="ij")
    clearance = np.full((gh, gw), np.inf)  # distance from a cell to the nearest placed disc (+gap)

    def block(x, y, r):
        np.minimum(clearance, np.hypot(gxx - x, gyy - y) - r - gap, out=clearance)

    for x, y, r in placed:
        block(x, y, r)
    out = np.zeros((len(radii), 2))
    for i in np.argsort(-radii, kind="stable"):
        r, m = radii[i], margin[i]
        ok = (gxx >= m) & (gxx <= nx - m) & (gyy >= m) & (gyy <= ny - m)
        if allowed is not None:
            ok &= np.asarray(allowed(gxx.ravel(), gyy.ravel(), r)).reshape(gh, gw)
        ok &= clearance >= r + 0.75 * scale
        cand = np.flatnonzero(ok)
        done = False
        for c in cand[rng.integers(0, len(cand), size=50)] if len(cand) else ():
            x = gxx.flat[c] + rng.uniform(-0.5, 0.5) * scale
            y = gyy.flat[c] + rng.uniform(-0.5, 0.5) * scale
            if not (m <= x <= nx - m and m <= y <= ny - m):
                continue
            if len(placed) and (np.hypot(placed[:, 0] - x, placed[:, 1] - y) < placed[:, 2] + r + gap).any():
                continue
            out[i] = (x, y)
            placed = np.vstack([placed, [x, y, r]])
            block(x, y, r)
            done = True
            break
        if not done:
            raise InputError("simulate spa --particles",
                             f"could not place {len(radii)} objects of up to {2 * radii.max():.0f} px without "
                             f"overlap on a {nx}x{ny} micrograph",
                             "decrease --particles or --junk-fraction, or increase --size")
    return out


# =========================================================================== image formation
def _soft(dist, width):
    """0 inside (dist < 0), 1 outside, smooth over ``width`` px."""
    return 0.5 * (1.0 + np.tanh(dist / max(width, 1e-3)))


def _noise_spectrum(xp, shape, pixel_size, psd, rng, ring=True):
    """rfft2 of a real Gaussian phase field with power ``psd · S(k)`` (rad² Å²).

    ``S(k) = 0.06 + 0.94 · min(1, (3.7 Å · k)²)`` plus a peak at the 3.7 Å water ring
    (``ring``), a coarse structure factor of amorphous ice; ``S = 1`` without ``ring``.
    """
    ny, nx = shape
    fy = np.fft.fftfreq(ny, d=pixel_size)
    fx = np.fft.rfftfreq(nx, d=pixel_size)
    k = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    shape_f = np.ones_like(k)
    if ring:
        shape_f = 0.06 + 0.94 * np.minimum(1.0, (3.7 * k) ** 2) + 1.5 * np.exp(-0.5 * ((k - 1 / 3.7) / 0.025) ** 2)
    var_px = psd / pixel_size**2  # per-pixel variance of a white field with this power
    amp = np.sqrt(var_px * ny * nx / 2.0) * np.sqrt(shape_f)
    z = rng.standard_normal((2,) + k.shape)
    spec = (amp * (z[0] + 1j * z[1])).astype(np.complex64)
    spec[0, 0] = 0.0
    return xp.asarray(spec)


def make_micrograph(shape, pixel_size: float, defocus_u: float, defocus_v: float, defocus_angle: float, *,
                    voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1,
                    bfactor: float = 50.0, model: ProteinModel | None = None, particles=(),
                    junk=(), carbon=None, ice_thickness: float = 250.0, ice_noise: float = 1.0,
                    contrast: float = 1.0, rng=None, xp=None, normalize_region=None) -> np.ndarray:
    """The noise-free relative intensity (mean 1) of one micrograph, float32 ``shape``.

    Parameters
    ----------
    shape : (ny, nx)
    defocus_u, defocus_v, defocus_angle : CTF of the ice centre (Å, Å, degrees; RELION's).
    particles : iterable of ``(x, y, rotation (3, 3), dz)`` — centres in px, height dz in Å
        (defocus of the particle = defocus + dz). Needs ``model``.
    junk : iterable of dicts ``{"type": "ice"|"contamination"|"aggregate", "x", "y", "r", ...}``
        as made by :func:`simulate_spa` (aggregates carry ``members`` like ``particles``).
    carbon : None or ``{"x", "y", "angle"}`` — a point on the edge (px) and the direction
        (degrees from +x) pointing into the carbon.
    normalize_region : ``(y0, x0, ny, nx)`` over which the mean is 1 (default: all).

    With no particles and no junk this is an ice-only image whose power spectrum shows the
    Thon rings of :func:`conveyor.spa.ctfmodel.ctf_2d` for the given CTF.
    """
    rng = _rng(rng)
    xp = xp or backend.xp()
    fft = fft_module(xp)
    ny, nx = shape
    sig_e = interaction_constant(voltage) * contrast
    amp = np.ones(shape, dtype=np.float32)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)

    # phase layers: height (Å) -> projected potential canvas (V·Å)
    layers: dict[float, np.ndarray] = {}

    def layer(dz):
        key = float(dz)
        if key not in layers:
            layers[key] = np.zeros(shape, dtype=np.float64)
        return layers[key]

    for x, y, rot, dz in particles:
        model.splat_projection(layer(dz), rot, x, y, pixel_size)
    base_phase = np.zeros(shape, dtype=np.float64)  # extra phase (rad) at the ice centre
    for j in junk:
        t = j["type"]
        if t == "aggregate":
            for x, y, rot, dz in j["members"]:
                model.splat_projection(layer(j.get("dz", 0.0)), rot, x, y, pixel_size)
            continue
        r = j["r"]
        y0, y1 = int(max(0, j["y"] - 2 * r - 8)), int(min(ny, j["y"] + 2 * r + 9))
        x0, x1 = int(max(0, j["x"] - 2 * r - 8)), int(min(nx, j["x"] + 2 * r + 9))
        if y1 <= y0 or x1 <= x0:
            continue
        sy, sx = yy[y0:y1, x0:x1] - j["y"], xx[y0:y1, x0:x1] - j["x"]
        if t == "ice":
            prof = 1.0 - _soft(np.hypot(sx, sy) - r, 0.08 * r + 1.0)
        else:  # contamination: union of ellipses
            prof = np.zeros_like(sx)
            for ex, ey, a, b, th in j["ellipses"]:
                c, s = np.cos(th), np.sin(th)
                u, v = (sx - ex) * c + (sy - ey) * s, -(sx - ex) * s + (sy - ey) * c
                rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
                prof = np.maximum(prof, 1.0 - _soft((rho - 1.0) * min(a, b), 2.0))
        amp[y0:y1, x0:x1] *= (1.0 - j["depth"] * prof).astype(np.float32)
        base_phase[y0:y1, x0:x1] += j["phase"] * prof

    spectra = []  # (dz, rfft2 of phase in rad)
    if carbon is not None:
        ang = np.deg2rad(carbon["angle"])
        dist = (xx - carbon["x"]) * np.cos(ang) + (yy - carbon["y"]) * np.sin(ang)
        mask = _soft(dist, 2.0).astype(np.float32)
        amp *= (1.0 - 0.1 * mask).astype(np.float32)
        base_phase += 0.4 * mask
        # amorphous carbon film, ~100 Å: about three times the phase noise of the same ice
        cn = fft.irfft2(_noise_spectrum(xp, shape, pixel_size, 300.0 * ICE_NOISE_PSD * ice_noise, rng, ring=False),
                        s=shape)
        spectra.append((-ice_thickness / 2.0, fft.rfft2(cn * xp.asarray(mask))))
    for dz, canvas in sorted(layers.items()):
        spectra.append((dz, fft.rfft2(xp.asarray(canvas * sig_e, dtype=xp.float32))))
    if base_phase.any():
        spectra.append((0.0, fft.rfft2(xp.asarray(base_phase, dtype=xp.float32))))
    if ice_noise > 0:
        for dz in (-ice_thickness / 3.0, 0.0, ice_thickness / 3.0):
            spectra.append((dz, _noise_spectrum(xp, shape, pixel_size,
                                                ICE_NOISE_PSD * ice_thickness * ice_noise / 3.0, rng)))

    total = xp.zeros((ny, nx // 2 + 1), dtype=xp.complex64)
    for dz, spec in spectra:
        ctf = ctf_2d(shape, pixel_size, defocus_u + dz, defocus_v + dz, defocus_angle, voltage, cs,
                     amplitude_contrast, bfactor=bfactor, rfft=True, xp=xp)
        total += spec * ctf.astype(xp.float32)
    contrast_img = backend.to_host(fft.irfft2(2.0 * total, s=shape)).astype(np.float32)

    # smooth ice-thickness variation (inelastic loss), a few per cent
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    lowpass = np.exp(-0.5 * (ky**2 + kx**2) / (1.5 / max(ny, nx)) ** 2)
    z = rng.standard_normal((2, ny, nx // 2 + 1))
    field = np.fft.irfft2((z[0] + 1j * z[1]) * lowpass, s=shape)
    field *= 0.01 / max(field.std(), 1e-12)
    amp *= np.exp(field).astype(np.float32)

    img = amp * (1.0 + contrast_img)
    np.maximum(img, 0.0, out=img)
    if normalize_region is None:
        mean = img.mean()
    else:
        y0, x0, h, w = normalize_region
        mean = img[y0:y0 + h, x0:x0 + w].mean()
    return (img / mean).astype(np.float32)


def make_movie(image, shifts, dose_per_frame: float, pixel_size: float, rng=None, crop=None, *,
               radiation_damage: bool = True, voltage: float = 300.0, local_coeffs=None,
               dtype=np.int16, noise: bool = True, xp=None) -> np.ndarray:
    """Frames ``[F, ny, nx]`` of Poisson counts from a clean relative-intensity image.

    Frame f shows ``image`` moved by ``+shifts[f]`` px (Fourier shift on the whole canvas,
    then ``crop = (y0, x0, ny, nx)``), low-passed by the radiation damage accumulated by
    the middle of the frame, optionally deformed by ``local_coeffs``
    (:func:`local_deformation`), and sampled with mean ``dose_per_frame · pixel_size² ·
    intensity`` counts per pixel. ``noise=False`` returns the expected counts (float32).
    """
    rng = _rng(rng)
    xp = xp or backend.xp()
    fft = fft_module(xp)
    img = xp.asarray(image, dtype=xp.float32)
    h, w = img.shape
    y0, x0, cy, cx = crop if crop is not None else (0, 0, h, w)
    shifts = np.asarray(shifts, dtype=float).reshape(-1, 2)
    n = len(shifts)
    lam0 = dose_per_frame * pixel_size**2
    spec = fft.rfft2(img)
    fy = xp.fft.fftfreq(h).astype(xp.float32)[:, None]
    fx = xp.fft.rfftfreq(w).astype(xp.float32)[None, :]
    kk = xp.sqrt(fy * fy + fx * fx) / pixel_size
    ne = critical_exposure(kk, voltage) if radiation_damage else None
    out = np.empty((n, cy, cx), dtype=np.float32 if not noise else dtype)
    if local_coeffs is not None:
        from scipy.ndimage import map_coordinates  # noqa: PLC0415

        gy, gx = np.mgrid[y0:y0 + cy, x0:x0 + cx].astype(np.float64)
    for f in range(n):
        dx, dy = shifts[f]
        ph = (-2.0 * np.pi) * (fx * dx + fy * dy)
        fs = spec * (xp.cos(ph) + 1j * xp.sin(ph))
        if ne is not None:
            fs = fs * xp.exp(-(f + 0.5) * dose_per_frame / (2.0 * ne)).astype(xp.float32)
        frame = fft.irfft2(fs, s=(h, w))
        if local_coeffs is not None:
            t = f / max(n - 1, 1)
            ddx, ddy = local_deformation(local_coeffs, (cy, cx), t)
            frame = map_coordinates(backend.to_host(frame), [gy - ddy, gx - ddx], order=3, mode="nearest")
        else:
            frame = backend.to_host(frame[y0:y0 + cy, x0:x0 + cx])
        lam = np.maximum(frame, 0.0) * lam0
        if noise:
            counts = rng.poisson(lam)
            info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
            out[f] = np.clip(counts, 0, info.max) if info else counts
        else:
            out[f] = lam
    return out


# =========================================================================== the data set
def _junk_object(kind, d_px, rng):
    if kind == "ice":
        r = rng.uniform(0.3, 0.65) * d_px
        return {"type": "ice", "r": r, "bound": r * 1.1, "depth": rng.uniform(0.25, 0.6), "phase": rng.uniform(0.3, 1.0)}
    if kind == "contamination":
        r = rng.uniform(0.45, 0.9) * d_px
        ells = []
        for _ in range(int(rng.integers(2, 5))):
            a, b = rng.uniform(0.25, 0.6) * r, rng.uniform(0.15, 0.45) * r
            t = rng.uniform(0, 2 * np.pi)
            off = rng.uniform(0, r - a) * np.array([np.cos(t), np.sin(t)])
            ells.append((off[0], off[1], a, b, rng.uniform(0, np.pi)))
        return {"type": "contamination", "r": r, "bound": r * 1.05, "ellipses": ells,
                "depth": rng.uniform(0.4, 0.75), "phase": rng.uniform(0.5, 1.5)}
    n = int(rng.integers(3, 7))
    return {"type": "aggregate", "r": 0.95 * d_px, "bound": 1.0 * d_px, "n": n}


def simulate_micrograph(model: ProteinModel, p: SpaSimParams, rng, carbon: bool = False):
    """One movie and its truth: ``(counts [F, n, n], info dict)`` for :func:`simulate_spa`."""
    rng = _rng(rng)
    px = p.pixel_size
    n = int(p.size)
    d_px = p.particle_diameter / px
    r_p = d_px / 2.0
    shifts = drift_trajectory(p.frames, rng, p.drift_range)
    local = None
    if p.local_motion > 0:
        local = rng.normal(0.0, 1.0, (2, 5))
        fx, fy = local_deformation(local, (33, 33), 1.0)
        local *= p.local_motion / max(np.hypot(fx, fy).max(), 1e-9)
    pad = int(np.ceil(np.abs(shifts).max() + p.local_motion + 8))
    canvas = good_size(n + 2 * pad)
    o = (canvas - n) // 2

    dfm = rng.uniform(*p.defocus_range)
    ast = rng.uniform(0.0, p.max_astigmatism)
    du, dv = dfm + ast / 2.0, dfm - ast / 2.0
    dang = rng.uniform(0.0, 180.0)
    bfac = rng.uniform(*p.bfactor_range)

    carbon_info = None
    if carbon:
        ang = rng.uniform(0, 360.0)
        nvec = np.array([np.cos(np.deg2rad(ang)), np.sin(np.deg2rad(ang))])
        g = np.linspace(0, n - 1, 48)
        proj = (np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) - (n - 1) / 2) @ nvec
        t = np.quantile(proj, 1.0 - rng.uniform(0.1, 0.3))
        pt = (n - 1) / 2 + t * nvec
        carbon_info = {"x": float(pt[0]), "y": float(pt[1]), "angle": float(ang)}

    def allowed(x, y, r):
        if carbon_info is None:
            return np.ones(len(x), bool)
        a = np.deg2rad(carbon_info["angle"])
        dist = (x - carbon_info["x"]) * np.cos(a) + (y - carbon_info["y"]) * np.sin(a)
        return dist < -(r + 4.0)

    # particles sit in the hole: a micrograph with carbon holds proportionally fewer
    hole = 1.0 if carbon_info is None else float(np.mean(allowed(*np.meshgrid(g, g), 0.0)))
    n_part = int(round(p.particles * hole))
    n_junk = int(round(p.junk_fraction * p.particles * hole))
    kinds = rng.choice(["aggregate", "ice", "contamination"], size=n_junk, p=[0.4, 0.4, 0.2])
    junk = [_junk_object(k, d_px, rng) for k in kinds]
    radii = np.array([r_p] * n_part + [j["bound"] for j in junk])
    edge = max(4.0, 0.1 * d_px)
    margin = np.where(np.arange(len(radii)) < n_part, radii + edge, 0.6 * radii)
    centres = place_objects((n, n), radii, rng, margin=margin, gap=2.0, allowed=allowed)

    half = max(0.0, (p.thickness - p.particle_diameter) / 2.0)
    step = 20.0

    def height():
        return float(np.round(rng.uniform(-half, half) / step) * step) if half > 0 else 0.0

    rots = random_rotations(n_part, rng)
    parts, rows = [], []
    for i in range(n_part):
        dz = height()
        x, y = centres[i]
        parts.append((x + o, y + o, rots[i], dz))
        rot, tilt, psi = matrix_to_euler(rots[i])
        rows.append({"rlnCoordinateX": x, "rlnCoordinateY": y, "rlnAngleRot": rot, "rlnAngleTilt": tilt,
                     "rlnAnglePsi": psi, "rlnDefocusU": du + dz, "rlnDefocusV": dv + dz,
                     "rlnDefocusAngle": dang, "cvIsJunk": 0, "cvJunkType": "particle", "cvRadius": r_p})
    junk_canvas = []
    for j, (x, y) in zip(junk, centres[n_part:]):
        jc = dict(j, x=x + o, y=y + o)
        dz = height()
        if j["type"] == "aggregate":
            ang = rng.uniform(0, 2 * np.pi, j["n"])
            offs = np.column_stack([np.cos(ang), np.sin(ang)]) * rng.uniform(0.25, 0.45, (j["n"], 1)) * d_px
            offs[0] = 0.0
            mrots = random_rotations(j["n"], rng)
            jc["members"] = [(x + o + a, y + o + b, mr, dz) for (a, b), mr in zip(offs, mrots)]
            jc["dz"] = dz
        junk_canvas.append(jc)
        rows.append({"rlnCoordinateX": x, "rlnCoordinateY": y, "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0,
                     "rlnAnglePsi": 0.0, "rlnDefocusU": du + dz, "rlnDefocusV": dv + dz,
                     "rlnDefocusAngle": dang, "cvIsJunk": 1, "cvJunkType": j["type"], "cvRadius": j["r"]})
    carbon_canvas = None if carbon_info is None else dict(carbon_info, x=carbon_info["x"] + o, y=carbon_info["y"] + o)

    clean = make_micrograph((canvas, canvas), px, du, dv, dang, voltage=p.voltage, cs=p.cs,
                            amplitude_contrast=p.amplitude_contrast, bfactor=bfac, model=model,
                            particles=parts, junk=junk_canvas, carbon=carbon_canvas,
                            ice_thickness=p.thickness, ice_noise=p.ice_noise, contrast=p.contrast,
                            rng=rng, normalize_region=(o, o, n, n))
    movie = make_movie(clean, shifts, p.dose_per_frame, px, rng, crop=(o, o, n, n),
                       radiation_damage=p.radiation_damage, voltage=p.voltage, local_coeffs=local,
                       dtype=np.int16 if (p.format == "mrc" and p.mrc_mode == "int16") else np.uint16,
                       noise=True)
    info = {
        "defocus_u": du, "defocus_v": dv, "defocus_angle": dang, "bfactor": bfac, "shifts": shifts,
        "objects": pd.DataFrame(rows), "carbon": carbon_info, "local": local,
        "drift_length": float(np.linalg.norm(np.diff(shifts, axis=0), axis=1).sum()),
    }
    return movie, info


def _write_tiff(path, data, pixel_size):
    """TIFF movie via conveyor.io.tiff when it offers a writer, else tifffile directly (atomic)."""
    try:
        from ..io import tiff as tiff_io  # noqa: PLC0415
    except ImportError:
        tiff_io = None
    writer = getattr(tiff_io, "write_tiff", None) if tiff_io else None
    if writer is not None:
        writer(path, data, pixel_size)
        return
    import tifffile  # noqa: PLC0415

    res = 1e8 / pixel_size  # pixels per cm
    with atomic_path(path) as tmp:  # rows flipped, as RELION/IMOD/MotionCor2 read TIFF movies
        tifffile.imwrite(tmp, np.ascontiguousarray(data[:, ::-1]), resolution=(res, res),
                         resolutionunit="CENTIMETER", description=f'{{"pixel_size": {pixel_size}}}', metadata=None)


def _experiment_name(out_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", out_dir.resolve().name).lstrip("_.-")
    return name or "simulated"


def simulate_spa(out_dir, **params) -> dict:
    """Simulate a cryo-EM SPA movie set with ground truth in ``out_dir`` (see the module docstring).

    Parameters are the fields of :class:`SpaSimParams`. Returns a dict of paths:
    ``movies`` (list), ``map``, ``micrographs``, ``shifts``, ``particles``, ``experiment``,
    ``params`` (and ``local_motion`` when used).
    """
    try:
        p = SpaSimParams(**params).validate()
    except TypeError as exc:
        known = ", ".join(f.name for f in dataclasses.fields(SpaSimParams))
        raise InputError("simulate spa", f"bad parameter ({exc})", f"use only: {known}") from None
    out = Path(out_dir)
    t0 = time.time()
    seeds = np.random.SeedSequence(int(p.seed)).spawn(p.micrographs + 2)
    model = make_model(p.particle_diameter, p.symmetry, np.random.default_rng(seeds[0]))
    box = map_box_size(p.particle_diameter, p.pixel_size)
    truth = out / "truth"
    paths = {"map": truth / "map.mrc"}
    write_mrc(paths["map"], model.volume(box, p.pixel_size), p.pixel_size, volume=True)

    layout = np.random.default_rng(seeds[1])
    n_carbon = int(round(p.micrographs * min(1.0, 2.5 * p.junk_fraction)))
    with_carbon = set(layout.choice(p.micrographs, size=n_carbon, replace=False).tolist()) if n_carbon else set()
    ext = ".mrc" if p.format == "mrc" else ".tif"
    mic_rows, shift_rows, obj_frames, local_rows, movies = [], [], [], [], []
    for i in range(p.micrographs):
        name = f"movies/mic_{i + 1:04d}{ext}"
        movie, info = simulate_micrograph(model, p, np.random.default_rng(seeds[i + 2]),
                                          carbon=i in with_carbon)
        path = out / name
        if p.format == "mrc":
            write_mrc(path, movie, p.pixel_size, volume=False,
                      dtype=np.int16 if p.mrc_mode == "int16" else np.float32)
        else:
            _write_tiff(path, movie.astype(np.uint8) if movie.max() < 256 else movie, p.pixel_size)
        movies.append(path)
        c = info["carbon"]
        mic_rows.append({
            "rlnMicrographMovieName": name, "rlnMicrographName": name,
            "rlnDefocusU": info["defocus_u"], "rlnDefocusV": info["defocus_v"],
            "rlnDefocusAngle": info["defocus_angle"], "rlnVoltage": p.voltage,
            "rlnSphericalAberration": p.cs, "rlnAmplitudeContrast": p.amplitude_contrast,
            "rlnMicrographPixelSize": p.pixel_size, "rlnMicrographDoseRate": p.dose_per_frame,
            "rlnCtfBfactor": info["bfactor"], "cvIceThickness": p.thickness,
            "cvHasCarbon": int(c is not None), "cvCarbonEdgeX": c["x"] if c else 0.0,
            "cvCarbonEdgeY": c["y"] if c else 0.0, "cvCarbonNormalAngle": c["angle"] if c else 0.0,
            "cvDriftLength": info["drift_length"],
        })
        for f, (sx, sy) in enumerate(info["shifts"]):
            shift_rows.append({"rlnMicrographName": name, "rlnMicrographFrameNumber": f + 1,
                               "rlnMicrographShiftX": sx, "rlnMicrographShiftY": sy})
        objs = info["objects"]
        objs.insert(0, "rlnMicrographName", name)
        obj_frames.append(objs)
        if info["local"] is not None:
            row = {"rlnMicrographName": name}
            for axis, coeffs in zip("XY", info["local"]):
                for term, v in zip(("u", "v", "uu", "uv", "vv"), coeffs):
                    row[f"cvLocal{axis}_{term}"] = float(v)
            local_rows.append(row)
        log.info("%s: defocus %.0f/%.0f Å, %d objects, drift %.1f px", name, info["defocus_u"],
                 info["defocus_v"], len(objs), info["drift_length"])

    paths["movies"] = movies
    paths["micrographs"] = truth / "micrographs.star"
    paths["shifts"] = truth / "shifts.star"
    paths["particles"] = truth / "particles.star"
    write_star(paths["micrographs"], {"micrographs": pd.DataFrame(mic_rows)})
    write_star(paths["shifts"], {"shifts": pd.DataFrame(shift_rows)})
    parts = pd.concat(obj_frames, ignore_index=True) if obj_frames else pd.DataFrame()
    if len(parts):
        parts["cvIsJunk"] = parts["cvIsJunk"].astype(int)
    write_star(paths["particles"], {"particles": parts})
    if local_rows:
        paths["local_motion"] = truth / "local_motion.star"
        write_star(paths["local_motion"], {"local_motion": pd.DataFrame(local_rows)})

    params_dict = dataclasses.asdict(p)
    params_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in params_dict.items()}
    params_dict["ice_thickness"] = p.thickness
    params_dict["map_box"] = box
    paths["params"] = truth / "simulation.yaml"
    write_text(paths["params"], yaml.safe_dump(params_dict, sort_keys=False))

    glob = str((out / "movies").resolve() / f"mic_*{ext}")
    exp = {
        "experiment": _experiment_name(out),
        "spa": {
            "movies": glob,
            "pixel_size": float(p.pixel_size),
            "voltage": int(p.voltage) if float(p.voltage).is_integer() else float(p.voltage),
            "cs": float(p.cs),
            "amplitude_contrast": float(p.amplitude_contrast),
            "dose_per_frame": float(p.dose_per_frame),
            "particle_diameter": float(p.particle_diameter),
            "symmetry": str(p.symmetry).upper(),
            "frames": int(p.frames),
        },
    }
    paths["experiment"] = out / "experiment.yaml"
    write_text(paths["experiment"], yaml.safe_dump(exp, sort_keys=False, allow_unicode=True))
    log.info("simulated %d movies in %.1f s", p.micrographs, time.time() - t0)
    return paths
