"""Tests of the SPI steps; helpers that make small synthetic diffraction patterns.

The patterns here are written independently of :mod:`conveyor.spi` so that they can
serve as ground truth: spheres (uniform density) in the Born approximation, photon
counts drawn from a Poisson distribution, a beamstop and detector gaps in the mask and
a beam centre that is not on a pixel.
"""

from __future__ import annotations

import numpy as np

# PR772-like geometry (LCLS AMO pnCCD, 4x4 binned): 1.6 keV, 0.586 m, 0.3 mm pixels.
WAVELENGTH_M = 7.75e-10
DISTANCE_M = 0.586
PIXEL_M = 0.3e-3
SHAPE = (200, 200)
NOMINAL_CENTER = (99.5, 100.0)  # (x, y) px
BEAMSTOP_PX = 40.0  # stoprad of the amo86615 (PR772) Dragonfly config


def sphere_amplitude(q, radius_m):
    """Sphere form-factor amplitude normalised to 1 at q = 0 (q in 1/m)."""
    x = np.asarray(q, dtype=np.float64) * radius_m
    out = np.ones_like(x)
    big = x > 1e-4
    xb = x[big]
    out[big] = 3.0 * (np.sin(xb) - xb * np.cos(xb)) / xb**3
    return out


def detector_mask(shape=SHAPE, center=NOMINAL_CENTER, beamstop=BEAMSTOP_PX, gaps=True):
    """Good-pixel mask: beamstop disc at the nominal centre, a horizontal and a vertical gap."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    good = (x - center[0]) ** 2 + (y - center[1]) ** 2 > beamstop**2
    if gaps:
        good[int(center[1]) + 11: int(center[1]) + 17, :] = False  # gap between panels
        good[:, int(center[0]) - 57: int(center[0]) - 54] = False  # a dead column block
        good[:5, :] = False  # a masked edge row block
    return good


def q_map(shape, center, pixel=PIXEL_M, distance=DISTANCE_M, wavelength=WAVELENGTH_M):
    """Momentum transfer vectors (qx, qy) and |q| (1/m) of a flat detector, [y, x] arrays."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dx = (x - center[0]) * pixel
    dy = (y - center[1]) * pixel
    norm = np.sqrt(dx**2 + dy**2 + distance**2)
    k = 2 * np.pi / wavelength
    qx = k * dx / norm
    qy = k * dy / norm
    qz = k * (distance / norm - 1.0)
    return qx, qy, np.sqrt(qx**2 + qy**2 + qz**2)


def sphere_pattern(shape, center, diameters_nm, offsets_nm=None, coherent=True, **geom):
    """Noise-free |F|^2 of one or more spheres (amplitude ~ volume), solid-angle weighted."""
    qx, qy, q = q_map(shape, center, **geom)
    diameters_nm = np.atleast_1d(diameters_nm)
    if offsets_nm is None:
        offsets_nm = np.zeros((len(diameters_nm), 2))
    amp = np.zeros(shape, dtype=np.complex128)
    inten = np.zeros(shape)
    for d, (ox, oy) in zip(diameters_nm, offsets_nm):
        r = 0.5e-9 * d
        a = (r / 35e-9) ** 3 * sphere_amplitude(q, r)
        if coherent:
            amp += a * np.exp(1j * (qx * ox * 1e-9 + qy * oy * 1e-9))
        else:
            inten += a**2
    inten = inten + np.abs(amp) ** 2 if coherent else inten
    pixel = geom.get("pixel", PIXEL_M)
    distance = geom.get("distance", DISTANCE_M)
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    rr = np.hypot((x - center[0]) * pixel, (y - center[1]) * pixel)
    solid = (distance / np.sqrt(rr**2 + distance**2)) ** 3
    return inten * solid


def make_frames(
    rng,
    diameters_nm,
    photons,
    *,
    center=(101.3, 98.6),
    background=0.002,
    shape=SHAPE,
    mask=None,
    multi=None,
    coherent=True,
    center_jitter=0.0,
    geom=None,
    in_mask=False,
):
    """A stack of Poisson frames.

    Parameters
    ----------
    diameters_nm : sequence, one per frame (NaN: empty frame)
    photons : sequence, one per frame: expected photons from the particle(s) on the whole
        detector (beamstop and gaps included), or on the good pixels when ``in_mask``
    background : expected background photons per pixel
    multi : sequence of lists of (diameter_nm, dx_nm, dy_nm) extra particles per frame, or None
    center_jitter : sd (px) of a per-frame beam-centre offset
    geom : dict(pixel=, distance=, wavelength=) overriding the PR772-like defaults

    Returns
    -------
    data [n, y, x] float32, mask [y, x] bool, centers [n, 2] (x, y)
    """
    n = len(diameters_nm)
    if mask is None:
        mask = detector_mask(shape)
    data = np.empty((n,) + tuple(shape), dtype=np.float32)
    centers = np.empty((n, 2))
    for i in range(n):
        c = np.asarray(center, dtype=float) + center_jitter * rng.standard_normal(2)
        centers[i] = c
        lam = np.full(shape, float(background))
        d = diameters_nm[i]
        if np.isfinite(d):
            ds = [d]
            offs = [(0.0, 0.0)]
            if multi is not None and multi[i]:
                for dd, ox, oy in multi[i]:
                    ds.append(dd)
                    offs.append((ox, oy))
            pat = sphere_pattern(shape, c, ds, offs, coherent=coherent, **(geom or {}))
            norm = (pat * mask).sum() if in_mask else pat.sum()
            lam = lam + photons[i] * pat / norm
        data[i] = rng.poisson(lam)
    return data * mask, mask, centers


# ---------------------------------------------------------------------------------------
# the simulator of conveyor.simulate.spi, run once per test session
# ---------------------------------------------------------------------------------------
_SIM_CACHE: dict = {}

#: A small PR772-like data set with every kind of frame: misses, single hits of the right
#: size, wrong-size particles (50 nm) and multiple hits, at a modest photon count.
SIM_PARAMS = dict(n_files=1, frames_per_file=240, seed=7, hit_fraction=0.5, multiple_hit_fraction=0.2,
                  wrong_size_fraction=0.2, photons_per_hit=3000.0)


def simulated(tmp_path_factory, **params):
    """Paths and truth table of a :func:`conveyor.simulate.spi.simulate_spi` data set (cached)."""
    import pytest

    sim = pytest.importorskip("conveyor.simulate.spi")
    import pandas as pd

    p = dict(SIM_PARAMS)
    p.update(params)
    key = tuple(sorted(p.items()))
    if key not in _SIM_CACHE:
        out = tmp_path_factory.mktemp("spi_sim")
        paths = sim.simulate_spi(out, **p)
        truth = pd.read_csv(paths["frames_csv"])
        _SIM_CACHE[key] = (paths, truth)
    return _SIM_CACHE[key]


def f1_score(pred, truth) -> float:
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    tp = np.count_nonzero(pred & truth)
    fp = np.count_nonzero(pred & ~truth)
    fn = np.count_nonzero(~pred & truth)
    return 2 * tp / max(2 * tp + fp + fn, 1)
