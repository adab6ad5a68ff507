"""Fourier shell correlation, resolution, phase randomisation and map alignment for validation.

Conventions
-----------
* Volumes are cubic ``[N, N, N]`` (``[z, y, x]``), centre at ``N // 2``; numpy or cupy.
* Shells are rings of integer radius in Fourier pixels: shell ``s`` holds the frequencies
  with ``round(|k|) == s`` (``|k|`` in units of ``1 / (N · pixel_size)``), for
  ``s = 0 .. N // 2``. Shell ``s`` is at spatial frequency ``s / (N · pixel_size)`` 1/Å,
  i.e. a resolution of ``N · pixel_size / s`` Å (shell 0: infinite; written as 999 Å in STAR
  files, as RELION does).
* ``FSC(s) = Re Σ F1 F2* / sqrt(Σ |F1|² · Σ |F2|²)`` over the shell (the half-space
  transform with Hermitian weights, so the sums equal those over the full transform).
* Resolution at a threshold (0.143 for two half maps, 0.5 against a reference): the
  first shell (from shell 1) where the curve falls below the threshold, interpolated
  linearly in frequency between that shell and the one before. A curve that never falls
  below it gives the Nyquist resolution ``2 · pixel_size`` (a lower bound).
* Phase randomisation (Chen et al. 2013): beyond a shell, amplitudes are kept and the
  phases replaced by those of the transform of white noise (so the map stays real).
  The FSC of masked maps corrected for the mask is
  ``FSC_true = (FSC_t − FSC_n) / (1 − FSC_n)`` with ``FSC_n`` the masked FSC of the
  phase-randomised maps, applied beyond the randomisation shell (see
  :func:`corrected_fsc`).

FSC files are STAR files with a ``data_fsc`` block: ``rlnSpectralIndex``,
``rlnResolution`` (1/Å), ``rlnAngstromResolution`` (Å) and ``rlnFourierShellCorrelation``,
plus any further curves as extra columns (RELION's names where RELION has one).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import backend
from ..errors import InputError
from .projection import fft_module

# --------------------------------------------------------------------------- shells


def _freq_3d(n: int, xp, rfft: bool = True):
    """Integer frequency components (kz, ky, kx) of an ``n³`` transform, broadcastable."""
    k = xp.fft.fftfreq(n, d=1.0 / n).astype(xp.float32)
    kx = (xp.arange(n // 2 + 1, dtype=xp.float32) if rfft else k)
    return k[:, None, None], k[None, :, None], kx[None, None, :]


def radius_3d(n: int, xp=np, rfft: bool = True):
    """``|k|`` in Fourier pixels on the ``rfftn`` (or full ``fftn``) grid of an ``n³`` volume."""
    kz, ky, kx = _freq_3d(n, xp, rfft)
    return xp.sqrt(kz * kz + ky * ky + kx * kx)


def shell_index_3d(n: int, xp=np, rfft: bool = True):
    """Integer shell ``round(|k|)`` of every voxel of the ``rfftn`` (or ``fftn``) grid."""
    return xp.rint(radius_3d(n, xp, rfft)).astype(xp.int64)


def hermitian_weights_3d(n: int, xp=np):
    """Weights of the ``rfftn`` half-space so sums equal sums over the full transform."""
    w = xp.full(n // 2 + 1, 2.0, dtype=xp.float32)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w[None, None, :]


def n_shells(n: int) -> int:
    """Number of shells reported for an ``n``-px box: ``n // 2 + 1`` (0 .. Nyquist)."""
    return n // 2 + 1


def shell_frequencies(n: int, pixel_size: float) -> np.ndarray:
    """Spatial frequency (1/Å) of shells ``0 .. n // 2``."""
    return np.arange(n_shells(n)) / (n * float(pixel_size))


def shell_resolutions(n: int, pixel_size: float) -> np.ndarray:
    """Resolution (Å) of shells ``0 .. n // 2`` (``inf`` for shell 0)."""
    f = shell_frequencies(n, pixel_size)
    with np.errstate(divide="ignore"):
        return np.where(f > 0, 1.0 / np.where(f > 0, f, 1.0), np.inf)


def resolution_to_shell(resolution: float, n: int, pixel_size: float) -> float:
    """Fractional shell index of a resolution in Å (``n · pixel_size / resolution``)."""
    return n * float(pixel_size) / float(resolution)


def shell_sums(values, shells, weights, n_out: int):
    """Sum of ``values · weights`` per integer shell, shells ``0 .. n_out - 1`` (host array)."""
    xp = backend.array_module(values)
    s = shells.ravel()
    v = (values * weights).ravel() if weights is not None else values.ravel()
    keep = s < n_out
    out = xp.bincount(s[keep], weights=v[keep].astype(xp.float64), minlength=n_out)[:n_out]
    return backend.to_host(out)


def _check_pair(vol1, vol2):
    if tuple(vol1.shape) != tuple(vol2.shape):
        raise InputError(None, f"maps have different shapes {tuple(vol1.shape)} and {tuple(vol2.shape)}",
                         "resample one map to the other's box and pixel size")
    if vol1.ndim != 3 or len(set(vol1.shape)) != 1:
        raise InputError(None, f"maps must be cubic [N, N, N], got {tuple(vol1.shape)}", "pad or crop to a cube")


# --------------------------------------------------------------------------- FSC
def fsc(vol1, vol2, mask=None) -> np.ndarray:
    """FSC per shell ``0 .. N // 2`` between two maps (optionally both multiplied by ``mask``).

    Returns a numpy array; shells where either map has no power give 0.
    """
    xp = backend.array_module(vol1)
    a = xp.asarray(vol1, dtype=xp.float32)
    b = xp.asarray(vol2, dtype=xp.float32)
    _check_pair(a, b)
    if mask is not None:
        m = xp.asarray(mask, dtype=xp.float32)
        a, b = a * m, b * m
    n = a.shape[0]
    fft = fft_module(xp)
    fa = fft.rfftn(a)
    fb = fft.rfftn(b)
    shells = shell_index_3d(n, xp)
    w = hermitian_weights_3d(n, xp)
    ns = n_shells(n)
    num = shell_sums(xp.real(fa * xp.conj(fb)), shells, w, ns)
    d1 = shell_sums(xp.abs(fa) ** 2, shells, w, ns)
    d2 = shell_sums(xp.abs(fb) ** 2, shells, w, ns)
    den = np.sqrt(d1 * d2)
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(out, -1.0, 1.0)


def resolution_at(curve, threshold: float, pixel_size: float, box: int | None = None) -> float:
    """Resolution (Å) where an FSC curve first falls below ``threshold`` (interpolated).

    ``curve`` holds shells ``0 .. N // 2``; ``box`` defaults to ``2 · (len(curve) - 1)``.
    Returns the Nyquist resolution ``2 · pixel_size · N / (2 · (len - 1))`` when the curve
    never falls below the threshold.
    """
    c = np.asarray(curve, dtype=float)
    n = int(box) if box is not None else 2 * (len(c) - 1)
    below = np.flatnonzero(c[1:] < threshold)
    if below.size == 0:
        return n * float(pixel_size) / (len(c) - 1)
    s = int(below[0]) + 1
    if s == 1:
        frac = 1.0 if c[0] <= threshold else (c[0] - threshold) / (c[0] - c[1])
        shell = max(frac, 0.5)
    else:
        shell = (s - 1) + (c[s - 1] - threshold) / (c[s - 1] - c[s])
    return n * float(pixel_size) / shell


def first_shell_below(curve, threshold: float) -> int:
    """Index of the first shell (from 1) where ``curve < threshold`` (``len(curve)`` if never)."""
    c = np.asarray(curve, dtype=float)
    below = np.flatnonzero(c[1:] < threshold)
    return int(below[0]) + 1 if below.size else len(c)


def ssnr_from_fsc(curve, combined: bool = False) -> np.ndarray:
    """Spectral SNR per shell from a half-map FSC: ``FSC / (1 − FSC)`` for one half map,
    ``2 FSC / (1 − FSC)`` for the map from both halves (``combined=True``); ≥ 0."""
    c = np.clip(np.asarray(curve, dtype=float), 0.0, 0.999)
    snr = c / (1.0 - c)
    return 2.0 * snr if combined else snr


def fsc_weighting(curve) -> np.ndarray:
    """Rosenthal & Henderson's figure of merit for the map from both halves: ``sqrt(2 FSC / (1 + FSC))``."""
    c = np.clip(np.asarray(curve, dtype=float), 0.0, 1.0)
    return np.sqrt(2.0 * c / (1.0 + c))


# --------------------------------------------------------------------------- phase randomisation
def phase_randomize(volume, from_shell: float, rng=None):
    """``volume`` with the phases of every shell ``>= from_shell`` randomised (amplitudes kept).

    The random phases are those of the transform of white noise, so Hermitian symmetry
    (a real map) is kept. ``rng``: seed or ``numpy.random.Generator``.
    """
    xp = backend.array_module(volume)
    fft = fft_module(xp)
    v = xp.asarray(volume, dtype=xp.float32)
    n = v.shape[0]
    rng = np.random.default_rng(rng)
    noise = xp.asarray(rng.standard_normal(v.shape).astype(np.float32))
    fv = fft.rfftn(v)
    fn = fft.rfftn(noise)
    phase = fn / xp.maximum(xp.abs(fn), 1e-30)
    sel = radius_3d(n, xp) >= float(from_shell) - 0.5
    fv = xp.where(sel, xp.abs(fv) * phase, fv)
    return fft.irfftn(fv, s=v.shape).astype(xp.float32)


def corrected_fsc(fsc_masked, fsc_randomized_masked, randomize_shell: int, skip: int = 2) -> np.ndarray:
    """Chen et al. (2013): ``(FSC_t − FSC_n) / (1 − FSC_n)`` beyond ``randomize_shell + skip``.

    Shells up to ``randomize_shell + skip`` keep the masked FSC (RELION's choice of
    ``skip = 2``: the phase-randomised maps still correlate just beyond the cut).
    """
    t = np.asarray(fsc_masked, dtype=float)
    r = np.asarray(fsc_randomized_masked, dtype=float)
    out = t.copy()
    start = int(randomize_shell) + int(skip) + 1
    if start < len(t):
        den = 1.0 - r[start:]
        out[start:] = np.where(den > 1e-6, (t[start:] - r[start:]) / np.where(den > 1e-6, den, 1.0), 0.0)
    return out


# --------------------------------------------------------------------------- STAR / plots
def fsc_table(curves: dict, box: int, pixel_size: float, main: str | None = None) -> pd.DataFrame:
    """A ``data_fsc`` table: index, 1/Å, Å and one column per curve.

    ``curves`` maps column labels (``rlnFourierShellCorrelation``, ...) to arrays over the
    shells; ``main`` names the curve also written as ``rlnFourierShellCorrelation``.
    """
    ns = n_shells(box)
    freq = shell_frequencies(box, pixel_size)
    res = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), 999.0)
    table = pd.DataFrame({"rlnSpectralIndex": np.arange(ns), "rlnResolution": freq, "rlnAngstromResolution": res})
    if main is not None and "rlnFourierShellCorrelation" not in curves:
        table["rlnFourierShellCorrelation"] = np.asarray(curves[main], dtype=float)[:ns]
    for label, values in curves.items():
        v = np.asarray(values, dtype=float)
        if v.shape[0] < ns:
            raise ValueError(f"curve {label} has {v.shape[0]} shells, need {ns}")
        table[label] = v[:ns]
    return table


def write_fsc_star(path, curves: dict, box: int, pixel_size: float, *, general: dict | None = None,
                   extra_blocks: dict | None = None) -> None:
    """Write FSC curves (see :func:`fsc_table`) and an optional ``data_general`` block."""
    from ..io.star import write_star  # noqa: PLC0415

    blocks = {}
    if general:
        blocks["general"] = pd.DataFrame([general])
    blocks["fsc"] = fsc_table(curves, box, pixel_size)
    if extra_blocks:
        blocks.update(extra_blocks)
    write_star(path, blocks)


def read_fsc_star(path) -> pd.DataFrame:
    """The ``data_fsc`` table of an FSC STAR file (RELION's postprocess.star works too)."""
    from ..io.star import read_star, require_columns  # noqa: PLC0415

    blocks = read_star(path)
    if "fsc" not in blocks:
        raise InputError(path, "no data_fsc block", "pass a file written by `conveyor spa fsc` or RELION postprocess")
    table = blocks["fsc"]
    require_columns(table, ["rlnSpectralIndex", "rlnResolution", "rlnFourierShellCorrelation"], path, block="fsc")
    return table


def plot_fsc(path, curves: dict, box: int, pixel_size: float, *, thresholds=(0.143, 0.5), title: str = "") -> None:
    """Plot FSC curves against spatial frequency (1/Å) into a PNG, with threshold lines."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415

    freq = shell_frequencies(box, pixel_size)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for label, values in curves.items():
        ax.plot(freq, np.asarray(values)[: len(freq)], label=label, lw=1.5)
    for t in thresholds:
        ax.axhline(t, color="0.5", lw=0.8, ls="--")
        ax.text(freq[-1], t + 0.01, f"{t:g}", ha="right", va="bottom", fontsize=8, color="0.4")
    ax.axhline(0.0, color="0.8", lw=0.6)
    ax.set_xlim(0, freq[-1])
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    top = ax.secondary_xaxis("top", functions=(lambda f: f, lambda f: f))
    ticks = [f for f in ax.get_xticks() if 0 < f <= freq[-1]]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1.0 / f:.3g}" for f in ticks])
    top.set_xlabel("resolution (Å)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- alignment (validation)
def _fibonacci_rotations(step_deg: float):
    """Rotation matrices covering SO(3) at about ``step_deg`` (Fibonacci directions × in-plane)."""
    from ..geometry import euler_to_matrix  # noqa: PLC0415

    step = math.radians(step_deg)
    nd = max(int(round(4.0 * math.pi / step**2)), 2)
    i = np.arange(nd) + 0.5
    z = 1.0 - 2.0 * i / nd
    phi = np.pi * (1.0 + 5.0**0.5) * i
    tilt = np.degrees(np.arccos(z))
    rot = np.degrees(np.mod(phi, 2 * np.pi))
    npsi = max(int(round(360.0 / step_deg)), 1)
    psi = np.arange(npsi) * 360.0 / npsi
    return euler_to_matrix(np.repeat(rot, npsi), np.repeat(tilt, npsi), np.tile(psi, nd))


def _small_rotations(step_deg: float):
    from ..geometry import rotation_about_axis  # noqa: PLC0415

    out = []
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            for c in (-1, 0, 1):
                v = np.array([a, b, c], dtype=float) * step_deg
                ang = np.linalg.norm(v)
                out.append(np.eye(3) if ang == 0 else rotation_about_axis(v / ang, ang))
    return np.array(out)


def mirror_volume(volume):
    """The mirror image of a map through the ``z = N // 2`` plane (the other hand)."""
    xp = backend.array_module(volume)
    v = xp.asarray(volume)
    n = v.shape[0]
    idx = (-(xp.arange(n) - n // 2)) % n
    idx = (idx + n // 2) % n
    return v[idx]


def centre_of_mass(volume):
    """Centre of mass (x, y, z) of the positive density, relative to the box centre ``N // 2``."""
    v = np.clip(backend.to_host(volume).astype(np.float64), 0, None)
    n = v.shape[0]
    tot = v.sum()
    if tot <= 0:
        return np.zeros(3)
    g = np.arange(n) - n // 2
    z = (v.sum(axis=(1, 2)) * g).sum() / tot
    y = (v.sum(axis=(0, 2)) * g).sum() / tot
    x = (v.sum(axis=(0, 1)) * g).sum() / tot
    return np.array([x, y, z])


def align_to_reference(moving, reference, pixel_size: float, *, resolution: float | None = None,
                       angular_step: float = 15.0, refine_steps: int = 5, pad: int = 2):
    """Rotate and shift ``moving`` onto ``reference`` (for validation against a known map).

    A global search over SO(3) at ``angular_step`` degrees of the normalised correlation of
    the low-resolution Fourier coefficients (60% of the radius of ``resolution``), then local
    refinement of the best 6 with all coefficients up to ``resolution`` (default
    ``max(4 · pixel_size, 15 Å)``), the step halved ``refine_steps`` times; translations from the
    centre of mass first, then the peak of the real-space cross-correlation after
    rotation. Returns ``(aligned, info)`` with ``info = {"rotation", "shift", "cc"}``: the
    aligned map is ``moving(Rᵀ (r − shift))``, i.e. :func:`conveyor.spa.projection.rotate_volume`
    by ``rotation`` then shifted by ``shift`` (x, y, z) px.
    """
    from .projection import rotate_volume  # noqa: PLC0415
    from .reconstruct import FourierVolume, shift_volume  # noqa: PLC0415

    xp = backend.array_module(moving)
    mov = xp.asarray(moving, dtype=xp.float32)
    ref = xp.asarray(reference, dtype=xp.float32)
    _check_pair(mov, ref)
    n = mov.shape[0]
    if resolution is None:
        resolution = max(4.0 * pixel_size, 15.0)
    rmax = min(resolution_to_shell(resolution, n, pixel_size), n / 2 - 1)
    # both maps centred on their centres of mass for the rotational search
    c_ref = centre_of_mass(ref)
    c_mov = centre_of_mass(mov)
    mov0 = shift_volume(mov, -c_mov)
    fft = fft_module(xp)
    fr = fft.rfftn(fft.ifftshift(shift_volume(ref, -c_ref)))
    kz, ky, kx = _freq_3d(n, xp)
    kz, ky, kx = (xp.broadcast_to(a, fr.shape) for a in (kz, ky, kx))
    r = xp.sqrt(kx * kx + ky * ky + kz * kz)
    fv = FourierVolume(mov0, pad=pad)

    def scorer(r_lim):
        sel = (r <= r_lim) & (r >= 1)
        hx = xp.where(kx > 0, 2.0, 1.0).astype(xp.float32)[sel]
        pts = xp.stack([kx[sel], ky[sel], kz[sel]], axis=-1).astype(xp.float32)
        fref = fr[sel]
        ref_norm = float(xp.sqrt((hx * xp.abs(fref) ** 2).sum()))

        def scores(rots):
            out = []
            for s in range(0, len(rots), 128):
                rr = xp.asarray(rots[s:s + 128], dtype=xp.float32)
                # rotated map V'(r) = V(Rᵀ r): F'(k) = F(Rᵀ k)
                q = xp.einsum("bji,kj->bki", rr, pts)
                vals = fv.sample(q)
                num = (hx * xp.real(vals * xp.conj(fref))).sum(axis=1)
                den = xp.sqrt((hx * xp.abs(vals) ** 2).sum(axis=1)) * ref_norm
                out.append(backend.to_host(num / xp.maximum(den, 1e-30)))
            return np.concatenate(out)

        return scores

    # global search on the coarser coefficients, local refinement on all up to the resolution
    scores = scorer(min(rmax, max(0.6 * rmax, 6.0)))
    rots = _fibonacci_rotations(angular_step)
    sc = scores(rots)
    order = np.argsort(sc)[::-1][:6]
    scores = scorer(rmax)
    sc = scores(rots[order])
    best_rots, best_sc = [], []
    for j0, i0 in enumerate(order):
        cur, cur_s = rots[i0], sc[j0]
        step = angular_step / 2.0
        for _ in range(refine_steps):
            for _ in range(3):  # hill-climb at this step
                cand = np.einsum("aij,jk->aik", _small_rotations(step), cur)
                s2 = scores(cand)
                j = int(np.argmax(s2))
                if s2[j] <= cur_s:
                    break
                cur, cur_s = cand[j], s2[j]
            step /= 2.0
        best_rots.append(cur)
        best_sc.append(cur_s)
    k = int(np.argmax(best_sc))
    rot = best_rots[k]
    rotated = shift_volume(rotate_volume(mov0, rot, order=3), c_ref)
    # translation from the cross-correlation peak (low-passed)
    fa = fft.rfftn(rotated)
    fb = fft.rfftn(ref)
    lp = (radius_3d(n, xp) <= rmax).astype(xp.float32)
    cc = fft.irfftn(fb * xp.conj(fa) * lp, s=rotated.shape)
    cc = backend.to_host(fft.fftshift(cc))
    iz, iy, ix = np.unravel_index(int(np.argmax(cc)), cc.shape)

    def parab(a, b, c):
        den = a - 2 * b + c
        return 0.5 * (a - c) / den if den < 0 else 0.0

    sub = []
    for ax, i in zip((2, 1, 0), (ix, iy, iz)):
        sl = [iz, iy, ix]
        lo, hi = list(sl), list(sl)
        lo[ax] = (i - 1) % n
        hi[ax] = (i + 1) % n
        sub.append(i - n // 2 + parab(cc[tuple(lo)], cc[tuple(sl)], cc[tuple(hi)]))
    t = np.array(sub)
    aligned = shift_volume(rotated, t)
    rot_c = np.asarray(rot)
    total_shift = c_ref + t - rot_c @ c_mov
    return aligned, {"rotation": rot_c, "shift": total_shift, "cc": float(best_sc[k])}
