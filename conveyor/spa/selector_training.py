"""Simulated particles, junk and 2D class averages with ground truth, and training of the class selector.

Objects (all seen through the CTF of a 300 kV microscope, weak-phase approximation, as in
:mod:`conveyor.simulate.spa`)
------------------------------------------------------------------------------------------
* ``particle`` — the projected Coulomb potential of a protein-like model
  (:func:`conveyor.simulate.spa.make_model`, random symmetry and size) at one view;
* ``ice`` — a dark ice ball: an amplitude disc (25–60 % intensity loss) with a phase step;
* ``contamination`` — an irregular union of ellipses, amplitude and phase;
* ``carbon`` — a carbon-film edge crossing the box within 15 % of the particle diameter of its
  centre (a picker centres such picks on the edge): amplitude and phase step plus the film's
  own phase noise;
* ``aggregate`` — 3–6 overlapping particles at random views;
* ``empty`` — ice only;
* ``off_centre`` — a particle 35–60 % of its diameter away from the box centre;
* ``mixed_views`` — (class averages only) particles at views spread over the whole sphere;
* ``junk_mix`` — (class averages only) 2–3 of the kinds above in one class, as EM groups
  carbon edges with empty and off-centre picks, or ice with contamination.

Image formation: relative intensity ``I = (1 - a) · (1 + 2 · CTF ⊗ φ + ice)`` with ``a`` the
amplitude objects, ``φ`` the phase (σ_e × projected potential), amorphous-ice phase noise
shaped like water's structure factor, a CTF envelope ``exp(-B k²/4)``; Gaussian shot noise
at the dose; then the image is inverted and its background normalised exactly as
:func:`conveyor.spa.extract.extract_particles` does (mean 0, sd 1 outside 0.375 × box).

Two generators use these objects:

* :func:`simulate_particle_stack` — particle images ``[n, B, B]`` with per-particle CTF
  parameters (RELION columns) and the truth (kind, view, angles, shift) for each image;
* :func:`simulate_class_set` — 2D class averages as :func:`conveyor.spa.classify2d.classify_2d`
  produces them, without running it: each class is a set of aligned particle images (with
  view spread, residual misalignment and contaminants), summed in Fourier space with their
  CTFs into two half sets (``Σ H X``, ``Σ H²``; the noise of the sums drawn with its exact
  variance), then filtered, masked and centred by the same code as the classifier
  (:func:`conveyor.spa.classify2d.wiener_update`, :func:`~conveyor.spa.classify2d.centre_averages`),
  which also gives the class resolution. Each object's image is in units of the background
  noise that :func:`form_images` gives (shot noise plus the ice noise through the CTF,
  :func:`_noise_sd`) and normalised as extraction does (background plane removed, divided by
  the background sd). The conditions (:func:`class_conditions`) span what a pipeline's
  classification rounds produce: 16–80 px boxes, 1–16 Å/px (bin-4 first rounds to
  full-size particles), masks of 0.9–1.5 particle diameters, 5–1500 particles per class.

:func:`train_selector` fits the class selector (:mod:`conveyor.spa.select`) on a simulated
class set and writes it as JSON; ``conveyor spa train-selector`` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import numpy as np
import pandas as pd

from ..geometry import euler_to_matrix, random_rotations, rotation_about_axis
from ..simulate.spa import ICE_NOISE_PSD, interaction_constant, make_model
from .ctfmodel import ctf_2d
from .extract import normalise_background

log = logging.getLogger(__name__)

JUNK_KINDS = ("ice", "contamination", "carbon", "aggregate", "empty", "off_centre")
CLASS_JUNK_KINDS = JUNK_KINDS + ("mixed_views", "junk_mix")
TRAINING_JUNK_KINDS = tuple(k for k in CLASS_JUNK_KINDS if k != "mixed_views")
"""The junk the selector is trained to reject. Mixed views are true particles (misaligned or
of a view too rare for a class of its own): rejecting them loses particles, and the next
round sorts them, so they are neither junk nor good in the training set."""
SYMMETRIES = ("C1", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "D2", "D3", "D4", "D5", "D6", "T", "O")


# --------------------------------------------------------------------------- specimens
def model_pool(n_models: int, rng, diameters=(90.0, 260.0), symmetries=SYMMETRIES):
    """``n_models`` protein-like models of random symmetry and diameter (Å)."""
    rng = np.random.default_rng(rng)
    out = []
    for _ in range(int(n_models)):
        sym = str(rng.choice(symmetries))
        d = float(rng.uniform(*diameters))
        out.append(make_model(d, sym, rng))
    return out


@dataclasses.dataclass
class Optics:
    """Microscope and sample of one simulated data set."""

    box: int
    pixel_size: float
    particle_diameter: float  # Å, of the specimen
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    dose: float = 40.0  # e/Å² in the whole exposure
    ice_thickness: float | None = None  # Å; default diameter + 100
    contrast: float = 1.0  # scale of the protein potential

    @property
    def d_px(self) -> float:
        return self.particle_diameter / self.pixel_size

    @property
    def thickness(self) -> float:
        return self.ice_thickness or self.particle_diameter + 100.0


class ObjectFactory:
    """Phase (rad) and amplitude (fraction of intensity lost) images of the simulated objects."""

    def __init__(self, optics: Optics, rng):
        self.o = optics
        self.rng = np.random.default_rng(rng)
        b = optics.box
        c = b // 2
        self.yy, self.xx = np.mgrid[0:b, 0:b].astype(np.float64) - c
        self.sig_e = interaction_constant(optics.voltage) * optics.contrast

    def zeros(self):
        b = self.o.box
        return np.zeros((b, b)), np.zeros((b, b))

    def particle(self, model, rotation, shift=(0.0, 0.0)):
        """Phase of ``model`` seen with ``rotation``, centred at ``box // 2 + shift`` (px); model scaled to the diameter.

        Residues are deposited bilinearly on the pixel grid and blurred with their Gaussian
        in Fourier space (exact projection of Gaussian blobs up to the deposition's
        interpolation).
        """
        o = self.o
        b = o.box
        scale = o.particle_diameter / max(model.diameter, 1e-6)
        q = model.positions @ np.asarray(rotation, dtype=float).T * scale
        c = b // 2
        x = q[:, 0] / o.pixel_size + c + shift[0]
        y = q[:, 1] / o.pixel_size + c + shift[1]
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = x - x0, y - y0
        x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
        img = np.zeros(b * b)
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            for dy, wy in ((0, 1.0 - fy), (1, fy)):
                xi, yi = x0 + dx, y0 + dy
                ok = (xi >= 0) & (xi < b) & (yi >= 0) & (yi < b)
                img += np.bincount(yi[ok] * b + xi[ok], weights=(wx * wy)[ok], minlength=b * b)
        sigma = model.sigma * scale / o.pixel_size  # px
        ky = np.fft.fftfreq(b)[:, None]
        kx = np.fft.rfftfreq(b)[None, :]
        blur = np.exp(-2.0 * np.pi**2 * sigma**2 * (kx * kx + ky * ky))
        img = np.fft.irfft2(np.fft.rfft2(img.reshape(b, b)) * blur, s=(b, b))
        # each residue carries scale³ × its potential (protein density kept), V·Å per pixel area
        return img * (scale**3 * model.weight / o.pixel_size**2) * self.sig_e, np.zeros((b, b))

    def _soft_disc(self, cx, cy, r, width):
        d = np.hypot(self.xx - cx, self.yy - cy) - r
        return 1.0 - 0.5 * (1.0 + np.tanh(d / max(width, 1e-3)))

    def ice(self, shift=(0.0, 0.0)):
        rng, d = self.rng, self.o.d_px
        r = rng.uniform(0.3, 0.65) * d
        prof = self._soft_disc(shift[0], shift[1], r, 0.08 * r + 1.0)
        return rng.uniform(0.3, 1.0) * prof, rng.uniform(0.25, 0.6) * prof

    def contamination(self, shift=(0.0, 0.0)):
        rng, d = self.rng, self.o.d_px
        r = rng.uniform(0.45, 0.9) * d
        prof = np.zeros_like(self.xx)
        for _ in range(int(rng.integers(2, 5))):
            a, bb = rng.uniform(0.25, 0.6) * r, rng.uniform(0.15, 0.45) * r
            t = rng.uniform(0, 2 * np.pi)
            off = rng.uniform(0, max(r - a, 1e-3)) * np.array([np.cos(t), np.sin(t)])
            th = rng.uniform(0, np.pi)
            cth, sth = np.cos(th), np.sin(th)
            u = (self.xx - shift[0] - off[0]) * cth + (self.yy - shift[1] - off[1]) * sth
            v = -(self.xx - shift[0] - off[0]) * sth + (self.yy - shift[1] - off[1]) * cth
            rho = np.sqrt((u / a) ** 2 + (v / bb) ** 2)
            prof = np.maximum(prof, 1.0 - 0.5 * (1.0 + np.tanh((rho - 1.0) * min(a, bb) / 2.0)))
        return rng.uniform(0.5, 1.5) * prof, rng.uniform(0.4, 0.75) * prof

    def carbon(self, angle=None, offset=None):
        rng, o = self.rng, self.o
        ang = np.deg2rad(rng.uniform(0, 360) if angle is None else angle)
        # a pick on a carbon edge is centred near the edge, where the picker's response peaks
        off = rng.uniform(-0.15, 0.15) * o.d_px if offset is None else offset
        dist = self.xx * np.cos(ang) + self.yy * np.sin(ang) - off
        mask = 0.5 * (1.0 + np.tanh(dist / 2.0))
        # the film's own phase noise (about three times that of the same thickness of ice)
        b = o.box
        noise = rng.standard_normal((b, b)) * math.sqrt(300.0 * ICE_NOISE_PSD) / o.pixel_size
        return 0.4 * mask + noise * mask, 0.1 * mask

    def aggregate(self, models, model=None, centre_rotation=None):
        """3–6 overlapping particles; the first at the centre (seen with ``centre_rotation`` when given)."""
        rng, d = self.rng, self.o.d_px
        nm = int(rng.integers(3, 7))
        phase = np.zeros((self.o.box, self.o.box))
        model = models[int(rng.integers(len(models)))] if model is None else model
        rots = random_rotations(nm, rng)
        if centre_rotation is not None:
            rots[0] = centre_rotation
        for j, rot in enumerate(rots):
            t = rng.uniform(0, 2 * np.pi)
            rr = 0.0 if j == 0 else rng.uniform(0.25, 0.45) * d
            p, _ = self.particle(model, rot, (rr * np.cos(t), rr * np.sin(t)))
            phase += p
        return phase, np.zeros_like(phase)


def ctf_parameters(n: int, rng) -> pd.DataFrame:
    """Per-particle CTF (RELION columns): defocus 0.8–2.5 µm, astigmatism ≤ 1000 Å."""
    rng = np.random.default_rng(rng)
    mean = rng.uniform(8000.0, 25000.0, n)
    ast = rng.uniform(0.0, 1000.0, n)
    return pd.DataFrame({"rlnDefocusU": mean + ast / 2, "rlnDefocusV": mean - ast / 2,
                         "rlnDefocusAngle": rng.uniform(0.0, 180.0, n)})


def _ice_shape(box, pixel_size):
    fy = np.fft.fftfreq(box, d=pixel_size)
    fx = np.fft.rfftfreq(box, d=pixel_size)
    k = np.hypot(fy[:, None], fx[None, :])
    return 0.06 + 0.94 * np.minimum(1.0, (3.7 * k) ** 2) + 1.5 * np.exp(-0.5 * ((k - 1 / 3.7) / 0.025) ** 2)


def form_images(phase, amp, ctf: pd.DataFrame, optics: Optics, rng, bfactors=None, normalise: bool = True):
    """Particle images ``[n, B, B]`` (inverted, background-normalised) from phase and amplitude images.

    ``phase`` / ``amp`` ``[n, B, B]``; ``ctf`` has one row per image. Noise: amorphous ice
    (CTF-filtered) and Gaussian shot noise at ``optics.dose``.
    """
    rng = np.random.default_rng(rng)
    o = optics
    n, b = phase.shape[0], o.box
    bf = rng.uniform(30.0, 90.0, n) if bfactors is None else np.broadcast_to(bfactors, (n,))
    ice_psd = ICE_NOISE_PSD * o.thickness / o.pixel_size**2
    shape_f = _ice_shape(b, o.pixel_size)
    out = np.empty((n, b, b), dtype=np.float32)
    lam = o.dose * o.pixel_size**2
    for i in range(n):
        c = ctf_2d((b, b), o.pixel_size, ctf["rlnDefocusU"].iloc[i], ctf["rlnDefocusV"].iloc[i],
                   ctf["rlnDefocusAngle"].iloc[i], o.voltage, o.cs, o.amplitude_contrast,
                   bfactor=float(bf[i]), rfft=True, xp=np)
        z = rng.standard_normal((2, b, b // 2 + 1))
        ice = (z[0] + 1j * z[1]) * np.sqrt(ice_psd * b * b / 2.0 * shape_f)
        spec = np.fft.rfft2(np.fft.ifftshift(phase[i])) + ice
        contrast = np.fft.fftshift(np.fft.irfft2(2.0 * c * spec, s=(b, b)))
        inten = (1.0 - amp[i]) * (1.0 + contrast)
        inten = np.maximum(inten, 0.0)
        counts = inten + rng.standard_normal((b, b)) * np.sqrt(np.maximum(inten, 1e-3) / lam)
        out[i] = -(counts - 1.0)
    if normalise:
        out = normalise_background(out)
    return out


# --------------------------------------------------------------------------- particle stacks
def simulate_particle_stack(n: int = 400, box: int = 64, pixel_size: float = 3.0, particle_diameter: float = 120.0,
                            symmetry: str = "D3", n_views: int = 3, junk_fraction: float = 0.25,
                            junk_kinds=("ice", "aggregate", "carbon", "contamination", "empty", "off_centre"),
                            junk_weights=None, view_jitter: float = 4.0, max_shift: float = 2.0,
                            dose: float = 40.0, seed: int = 0, model=None, views=None,
                            neighbour_fraction: float = 0.0):
    """A particle stack with ground truth: ``(images [n, B, B], ctf DataFrame, truth DataFrame, info)``.

    Particles are projections of one protein-like model at ``n_views`` views (random
    directions, rlnAngleRot/Tilt ± ``view_jitter`` degrees), uniform in-plane angle and a
    shift up to ``max_shift`` px; ``n_views=None`` gives every particle its own direction,
    uniform over the sphere, as in a data set without preferred orientation. Junk images
    (``junk_fraction`` of the stack) are drawn from ``junk_kinds``. ``neighbour_fraction`` of
    the images (particles and junk alike) also hold a neighbouring particle, its centre 1.0–1.4
    diameters from the box centre, as picks in a crowded micrograph do. Images are shuffled.
    ``truth`` columns: ``kind``, ``is_junk``, ``view`` (index into ``info["views"]``; the
    image's own index with ``n_views=None``; -1 for junk), ``rot``, ``tilt``, ``psi`` (degrees),
    ``dx``, ``dy`` (px, where the particle lies relative to the box centre). ``info`` holds the
    model, its views and the optics.
    """
    rng = np.random.default_rng(seed)
    optics = Optics(box=box, pixel_size=pixel_size, particle_diameter=particle_diameter, dose=dose)
    if model is None:
        model = make_model(particle_diameter, symmetry, np.random.default_rng(rng.integers(2**31)))
    fac = ObjectFactory(optics, rng)
    random_views = views is None and n_views is None
    if views is None and not random_views:
        views = [(float(rng.uniform(0, 360)), float(np.rad2deg(np.arccos(rng.uniform(-1, 1))))) for _ in range(n_views)]
    nj = int(round(junk_fraction * n))
    ng = n - nj
    kinds = ["particle"] * ng
    if nj:
        w = np.ones(len(junk_kinds)) if junk_weights is None else np.asarray(junk_weights, dtype=float)
        kinds += list(rng.choice(list(junk_kinds), size=nj, p=w / w.sum()))
    kinds = np.array(kinds, dtype=object)[rng.permutation(n)]
    phase = np.zeros((n, box, box))
    amp = np.zeros((n, box, box))
    rows = []
    carbon_angle = None
    for i, kind in enumerate(kinds):
        view, rot, tilt, psi, dx, dy = -1, 0.0, 0.0, 0.0, 0.0, 0.0
        if kind in ("particle", "off_centre"):
            if random_views:
                view, rot, tilt = i, float(rng.uniform(0, 360)), float(np.rad2deg(np.arccos(rng.uniform(-1, 1))))
            else:
                view = int(rng.integers(len(views)))
                rot = views[view][0] + rng.normal(0, view_jitter)
                tilt = views[view][1] + rng.normal(0, view_jitter)
            psi = rng.uniform(-180, 180)
            if kind == "particle":
                dx, dy = rng.uniform(-max_shift, max_shift, 2)
            else:
                t = rng.uniform(0, 2 * np.pi)
                rr = rng.uniform(0.35, 0.6) * optics.d_px
                dx, dy = rr * np.cos(t), rr * np.sin(t)
                view = -1
            phase[i], amp[i] = fac.particle(model, euler_to_matrix(rot, tilt, psi), (dx, dy))
        elif kind == "ice":
            phase[i], amp[i] = fac.ice(rng.uniform(-max_shift, max_shift, 2))
        elif kind == "contamination":
            phase[i], amp[i] = fac.contamination(rng.uniform(-max_shift, max_shift, 2))
        elif kind == "carbon":
            phase[i], amp[i] = fac.carbon(angle=carbon_angle)
        elif kind == "aggregate":
            phase[i], amp[i] = fac.aggregate([model])
        rows.append({"kind": kind, "is_junk": int(kind != "particle"), "view": view, "rot": rot, "tilt": tilt,
                     "psi": psi, "dx": dx, "dy": dy})
    if neighbour_fraction > 0:
        for i in np.flatnonzero(rng.uniform(size=n) < neighbour_fraction):
            t = rng.uniform(0, 2 * np.pi)
            rr = rng.uniform(1.0, 1.4) * optics.d_px
            phase[i] += fac.particle(model, random_rotations(1, rng)[0], (rr * np.cos(t), rr * np.sin(t)))[0]
    ctf = ctf_parameters(n, rng)
    images = form_images(phase, amp, ctf, optics, rng)
    truth = pd.DataFrame(rows)
    return images, ctf, truth, {"model": model, "views": views, "optics": optics}


# --------------------------------------------------------------------------- class averages
@dataclasses.dataclass
class SimulatedClass:
    """One simulated 2D class average with its truth."""

    average: np.ndarray  # [B, B], masked, centred
    count: int
    resolution: float  # Å
    pixel_size: float
    mask_diameter: float  # Å (the particle diameter given to the classifier)
    kind: str  # "particle" or a junk kind
    label: int  # 1 good, 0 junk
    run: int = 0  # the simulated classification the class belongs to (shared specimen and conditions)


def _transfer_sums(n: int, box: int, pixel_size: float, rng, max_samples: int = 24, half: int | None = None):
    """CTF sums of ``n`` particles split at random into two halves (all in ``half`` when given).

    Returns ``(sums, h_data)``: ``sums`` = ``(Σ H H_data, Σ H, Σ H²)`` each ``[2, B, B//2+1]``
    with ``H = -CTF`` (what the classifier uses) and ``H_data = -CTF · exp(-B k²/4)`` (what the
    images carry); ``h_data`` ``[B, B//2+1]`` is one particle's ``H_data`` (a representative
    image for the background normalisation). At most ``max_samples`` CTFs are drawn per half
    and the sums scaled to the half's size.
    """
    from .ctfmodel import electron_wavelength  # noqa: PLC0415

    halves = np.bincount(rng.integers(0, 2, n), minlength=2) if half is None else np.bincount([half], [n], 2)
    fy = np.fft.fftfreq(box, d=pixel_size)[:, None]
    fx = np.fft.rfftfreq(box, d=pixel_size)[None, :]
    k2 = fx * fx + fy * fy
    theta = np.arctan2(np.broadcast_to(fy, k2.shape), np.broadcast_to(fx, k2.shape))
    c2t, s2t = np.cos(2 * theta), np.sin(2 * theta)
    lam = electron_wavelength(300.0)
    cs_a = 2.7e7
    w = 0.1
    out = np.zeros((3, 2, box, box // 2 + 1))
    rep = None
    for hh in (0, 1):
        nh = int(halves[hh])
        if nh == 0:
            continue
        m = min(nh, max_samples)
        p = ctf_parameters(m, rng)
        u, v = p["rlnDefocusU"].to_numpy()[:, None, None], p["rlnDefocusV"].to_numpy()[:, None, None]
        a = np.deg2rad(p["rlnDefocusAngle"].to_numpy())[:, None, None]
        dz = 0.5 * ((u + v) + (u - v) * (c2t * np.cos(2 * a) + s2t * np.sin(2 * a)))
        chi = np.pi * lam * dz * k2 - 0.5 * np.pi * cs_a * lam**3 * k2 * k2
        h = np.sqrt(1.0 - w * w) * np.sin(chi) + w * np.cos(chi)  # -CTF of conveyor.spa.ctfmodel
        env = np.exp(-rng.uniform(30.0, 90.0, m)[:, None, None] * k2[None] / 4.0)
        scale = nh / m
        out[0, hh] = (h * h * env).sum(0) * scale
        out[1, hh] = h.sum(0) * scale
        out[2, hh] = (h * h).sum(0) * scale
        if rep is None:
            rep = h[0] * env[0]
    return out, rep


def _background_plane(img, bg_radius: float):
    """Plane fitted to ``img`` outside ``bg_radius`` px and the variance left there (extraction's normalisation)."""
    b = img.shape[-1]
    yy, xx = np.mgrid[0:b, 0:b].astype(np.float64) - b // 2
    bg = np.hypot(xx, yy) > bg_radius
    design = np.stack([np.ones(bg.sum()), xx[bg], yy[bg]], axis=1)
    coef, *_ = np.linalg.lstsq(design, img[bg], rcond=None)
    plane = coef[0] + coef[1] * xx + coef[2] * yy
    return plane, float(np.var(img[bg] - plane[bg]))


def _noise_sd(optics: Optics, h_data) -> float:
    """Background sd per pixel (relative intensity) of an image that :func:`form_images` forms.

    Shot noise ``1 / (dose · pixel²)`` plus the amorphous-ice phase noise through the CTF:
    the mean over all frequencies of ``4 · H_data² · PSD_ice · S(k)`` (``h_data``
    ``[B, B//2+1]``, rfft layout; ``S`` the water structure-factor shape). At coarse pixels
    the ice term is small (``S`` and the CTF are small at low frequency) and shot noise
    dominates; at fine pixels the ice term matters.
    """
    b, ps = optics.box, optics.pixel_size
    shot = 1.0 / (optics.dose * ps**2)
    psd = ICE_NOISE_PSD * optics.thickness / ps**2 * _ice_shape(b, ps)
    weight = np.full(h_data.shape[-1], 2.0)  # rfft columns stand for themselves and their conjugates
    weight[0] = 1.0
    if b % 2 == 0:
        weight[-1] = 1.0
    ice = float((4.0 * h_data**2 * psd * weight).sum() / (b * b))
    return math.sqrt(shot + ice)


def class_average_from_groups(groups, optics: Optics, mask_diameter: float, rng, centre_shift: float = 5.0):
    """A class average from groups of identical objects: ``groups`` = [(phase, amp, n_particles, shared), ...].

    A ``shared`` group (one consistent object, e.g. a particle view) has its particles split
    between the two half sets; otherwise the group is one of many different objects (ice
    balls, aggregates: each one unique in a real data set) and goes whole into one half, the
    halves alternating, so that the half-set FRC sees the heterogeneity. Returns
    ``(average [B, B], resolution Å, count)`` computed as the classifier does.
    """
    from . import classify2d as c2  # noqa: PLC0415

    rng = np.random.default_rng(rng)
    b, ps = optics.box, optics.pixel_size
    s_half = np.zeros((2, b, b // 2 + 1), dtype=np.complex128)
    c_half = np.zeros((2, b, b // 2 + 1))
    n_half = np.zeros((2, b, b // 2 + 1))  # noise power of the sums
    count = 0
    alternate = int(rng.integers(2))
    for phase, amp, n_g, shared in groups:
        n_g = int(n_g)
        if n_g < 1:
            continue
        count += n_g
        half = None
        if not shared:
            half, alternate = alternate, 1 - alternate
        (hhd, hsum, h2), rep = _transfer_sums(n_g, b, ps, rng, half=half)
        sd = _noise_sd(optics, rep)
        ph = np.fft.rfft2(np.fft.ifftshift(phase))
        am = np.fft.rfft2(np.fft.ifftshift(amp))
        # inverted images (protein white), in units of the noise: X = (2 H_data Φ + A) / sd + N,
        # then extraction's normalisation: the plane fitted to the background ring is
        # subtracted and the image divided by the background sd (noise and object together)
        img = np.fft.fftshift(np.fft.irfft2((2.0 * rep * ph + am) / sd, s=(b, b)))
        plane, var_bg = _background_plane(img, 0.375 * b)
        scale = 1.0 / np.sqrt(1.0 + var_bg)
        pl = np.fft.rfft2(np.fft.ifftshift(plane))
        s_half += scale * ((hhd * 2.0 * ph + hsum * am) / sd - hsum * pl)
        c_half += h2
        n_half += scale**2 * h2
    # noise of the sums: Σ H N with E|N|² = B² (unit-variance pixels)
    for hh in (0, 1):
        white = np.fft.rfft2(rng.standard_normal((b, b)))
        s_half[hh] += np.sqrt(n_half[hh]) * white
    grid = c2.FrequencyGrid(b, b // 2 - 1, np)
    mask = c2.soft_mask(b, min(0.5 * mask_diameter / ps, b / 2 - 1), 3.0, np)
    upd = c2.wiener_update(grid, grid.crop(s_half.astype(np.complex64))[:, None], grid.crop(c_half.astype(np.float32))[:, None],
                           mask, ps,
                           masses=np.array([count]), min_mass=3.0)
    avg = upd.averages
    if centre_shift > 0:
        avg, _ = c2.centre_averages(avg, mask, max_shift=centre_shift)
    return np.asarray(avg[0], dtype=np.float32), float(upd.resolution[0]), count


def _split(n, parts, rng):
    """``n`` particles into ``parts`` groups (multinomial, each group ≥ 0)."""
    return rng.multinomial(n, np.ones(parts) / parts)


BOXES = (16, 20, 20, 24, 28, 32, 32, 40, 48, 56, 64, 80)
"""Box sizes (px) of the simulated classes: bin-4 first rounds (16–32 px) to full-size boxes."""


def class_conditions(rng, box: int | None = None):
    """Optics and mask diameter (px) of one simulated classification, as a pipeline produces them.

    Box ``B`` from :data:`BOXES`; particle diameter ``B / U(1.3, 2.6)`` px (extraction boxes of
    1.3–2.6 particle diameters); specimen 80–400 Å, so the pixel size follows (clipped to
    1–16 Å/px, which covers bin 1 to bin 4 of 1–4 Å/px data); the mask (the particle diameter
    the user gives the classifier) 0.9–1.5 specimen diameters, at most ``B - 2`` px; dose
    20–80 e/Å², ice 30–300 Å thicker than the particle, protein contrast × 0.6–1.4 (specimens
    and detectors differ from the simulated ones).
    Returns ``(optics, mask_px)``.
    """
    box = int(box or rng.choice(BOXES))
    d_px = box / rng.uniform(1.3, 2.6)
    pixel_size = float(np.clip(rng.uniform(80.0, 400.0) / d_px, 1.0, 16.0))
    diameter = d_px * pixel_size
    mask_px = float(min(d_px * rng.uniform(0.9, 1.5), box - 2.0))
    optics = Optics(box=box, pixel_size=pixel_size, particle_diameter=diameter, dose=rng.uniform(20.0, 80.0),
                    ice_thickness=diameter + rng.uniform(30.0, 300.0), contrast=rng.uniform(0.6, 1.4))
    return optics, mask_px


def _class_size(rng) -> int:
    """Particles in one class: log-uniform 5–1500 (few-particle classes of many-class runs to large ones)."""
    return int(np.exp(rng.uniform(np.log(5), np.log(1500))))


def simulate_class(kind: str, models, rng, box: int | None = None, *, model=None, optics: Optics | None = None,
                   mask_px: float | None = None, n: int | None = None, run: int = 0) -> SimulatedClass:
    """One simulated class average of ``kind`` (``"particle"`` or one of :data:`CLASS_JUNK_KINDS`).

    ``optics`` and ``mask_px`` (the mask diameter in px) default to :func:`class_conditions`,
    ``model`` (the specimen) to one of ``models``, the population ``n`` to a log-uniform
    5–1500.
    """
    rng = np.random.default_rng(rng)
    if optics is None or mask_px is None:
        optics, mask_px = class_conditions(rng, box)
    pixel_size = optics.pixel_size
    fac = ObjectFactory(optics, rng)
    if model is None:
        model = models[int(rng.integers(len(models)))]
    n = int(n or _class_size(rng))
    groups = []
    centre_shift = float(rng.uniform(0.0, min(6.0, 0.2 * optics.box)))  # what centring moved the average
    if kind == "particle":
        groups = _good_groups(fac, model, models, n, rng)
    else:
        for sub, n_sub in _junk_parts(kind, n, rng):
            groups += _junk_groups(fac, sub, n_sub, model, models, centre_shift, rng)
        n_good = int(round(n * rng.uniform(0.0, 0.05 if kind == "empty" else 0.15)))
        for rot in random_rotations(min(n_good, 3), rng):
            groups.append((*fac.particle(model, rot, rng.normal(0, 1.0, 2)), n_good // min(n_good, 3), False))
        # EM aligns every junk object to the same reference, so what the objects share (a
        # blob's rim, a carbon edge) is in both half sets and junk classes often reach the
        # resolution of the particle classes, or better for high-contrast objects: a random
        # share of the objects is split between the halves, from none (the FRC sees only
        # the heterogeneity) to all
        consistent = rng.uniform()
        groups = [(ph, am, n_g, shared or bool(rng.uniform() < consistent)) for ph, am, n_g, shared in groups]
    avg, res, count = class_average_from_groups(groups, optics, mask_px * pixel_size, rng, centre_shift=centre_shift)
    return SimulatedClass(average=avg, count=count, resolution=res, pixel_size=pixel_size,
                          mask_diameter=mask_px * pixel_size, kind=kind, label=int(kind == "particle"), run=run)


def simulate_run(models, rng, kinds=TRAINING_JUNK_KINDS, good_fraction=(0.25, 0.85), n_classes=(4, 20),
                 run: int = 0) -> list[SimulatedClass]:
    """The classes of one simulated 2D classification: one specimen, one set of conditions.

    ``n_classes`` classes (drawn from the range), each a particle class with a probability
    drawn from ``good_fraction``, else junk of one of ``kinds``. Particle classes hold 5–1500
    particles (log-uniform), junk classes 0.2–1 times as many, so that most of a run's
    particles are usually in particle classes, as in the picks of a usable data set, but
    not always.
    """
    rng = np.random.default_rng(rng)
    optics, mask_px = class_conditions(rng)
    model = models[int(rng.integers(len(models)))]
    k = int(rng.integers(n_classes[0], n_classes[1] + 1))
    p_good = float(rng.uniform(*good_fraction))
    out = []
    for _ in range(k):
        kind = "particle" if rng.uniform() < p_good else str(rng.choice(list(kinds)))
        n = _class_size(rng)
        if kind != "particle":
            n = max(3, int(round(n * rng.uniform(0.2, 1.0))))
        out.append(simulate_class(kind, models, rng, model=model, optics=optics, mask_px=mask_px, n=n, run=run))
    return out


def _good_groups(fac: ObjectFactory, model, models, n: int, rng):
    """Groups of a good class: one view with the spread of a real class, and what EM mixes in.

    View spread: rotations about random axes with sd 0–20° (a class of a many-class run holds
    a cap of views; fewer classes of an asymmetric particle, a wider one), ψ sd 0–6°, shifts sd
    0–1 px. Mixed in: up to 30 % of one kind of junk, each object different (aggregates
    centred on a particle of the view, carbon edges aligned with each other, empty or
    off-centre picks); in half of the classes up to 40 % of particles with a neighbour
    1.0–1.4 diameters away (crowded micrographs).
    """
    view = random_rotations(1, rng)[0]
    cone = rng.uniform(0.0, 20.0)
    psi_sd = rng.uniform(0.0, 6.0)
    shift_sd = rng.uniform(0.0, 1.0)
    n_bad = int(round(n * rng.uniform(0.0, 0.3)))
    n_nb = int(round(n * rng.uniform(0.0, 0.4))) if rng.uniform() < 0.5 else 0
    n_nb = min(n_nb, n - n_bad)
    n_ok = n - n_bad - n_nb
    groups = []

    def view_rotation():
        axis = rng.standard_normal(3)
        return euler_to_matrix(0.0, 0.0, rng.normal(0, psi_sd)) @ view @ rotation_about_axis(axis, rng.normal(0, cone))

    for n_g in _split(n_ok, int(min(max(n_ok, 1), 8)), rng):
        groups.append((*fac.particle(model, view_rotation(), rng.normal(0, shift_sd, 2)), n_g, True))
    for n_g in (_split(n_nb, min(n_nb, 6), rng) if n_nb else []):
        ph, am = fac.particle(model, view_rotation(), rng.normal(0, shift_sd, 2))
        t = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(1.0, 1.4) * fac.o.d_px
        ph = ph + fac.particle(model, random_rotations(1, rng)[0], (rr * np.cos(t), rr * np.sin(t)))[0]
        groups.append((ph, am, n_g, False))
    bad = str(rng.choice(["aggregate", "carbon", "empty", "off_centre"]))
    edge_angle = rng.uniform(0, 360)
    for n_g in (_split(n_bad, min(n_bad, 6), rng) if n_bad else []):
        if bad == "aggregate":
            obj = fac.aggregate(models, model=model, centre_rotation=view)
        elif bad == "carbon":
            obj = fac.carbon(angle=edge_angle + rng.normal(0, 10))
        else:
            obj = _junk_object(fac, bad, models, rng)
        groups.append((*obj, n_g, False))
    return groups


def _junk_parts(kind: str, n: int, rng):
    """``[(kind, particles)]`` of a junk class: one kind, or for ``junk_mix`` 2–3 kinds in random shares."""
    if kind != "junk_mix":
        return [(kind, n)]
    kinds = rng.choice(JUNK_KINDS, size=int(rng.integers(2, 4)), replace=False)
    sizes = rng.multinomial(n, rng.dirichlet(np.ones(len(kinds))))
    return [(str(k), int(s)) for k, s in zip(kinds, sizes) if s > 0]


def _junk_groups(fac: ObjectFactory, kind: str, n: int, model, models, centre_shift: float, rng):
    """Groups of ``n`` junk objects of one kind (each group one object, as EM aligned them)."""
    optics = fac.o
    g = int(min(n, rng.integers(5, 10) if kind in ("carbon", "off_centre", "empty") else rng.integers(10, 21)))
    sizes = _split(n, g, rng)
    groups = []
    if kind == "carbon":
        angle = rng.uniform(0, 360)
        for n_g in sizes:
            groups.append((*fac.carbon(angle=angle + rng.normal(0, 4)), n_g, False))
    elif kind == "off_centre":  # still off-centre by a quarter to half a diameter after centring
        view = random_rotations(1, rng)[0]
        t = rng.uniform(0, 2 * np.pi)
        rr = centre_shift + rng.uniform(0.25, 0.5) * optics.d_px
        for n_g in sizes:
            sh = (rr * np.cos(t) + rng.normal(0, 1.0), rr * np.sin(t) + rng.normal(0, 1.0))
            groups.append((*fac.particle(model, view, sh), n_g, True))
    elif kind == "mixed_views":
        g = int(min(n, rng.integers(10, 20)))
        for n_g, rot in zip(_split(n, g, rng), random_rotations(g, rng)):
            groups.append((*fac.particle(model, rot, rng.normal(0, 1.0, 2)), n_g, False))
    else:
        for n_g in sizes:
            groups.append((*_junk_object(fac, kind, models, rng), n_g, False))
    return groups


def _junk_object(fac: ObjectFactory, kind: str, models, rng):
    jit = rng.normal(0, 1.5, 2)
    if kind == "ice":
        return fac.ice(jit)
    if kind == "contamination":
        return fac.contamination(jit)
    if kind == "carbon":
        return fac.carbon()
    if kind == "aggregate":
        return fac.aggregate(models)
    if kind == "off_centre":
        t = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(0.35, 0.6) * fac.o.d_px
        return fac.particle(models[int(rng.integers(len(models)))], random_rotations(1, rng)[0],
                            (rr * np.cos(t), rr * np.sin(t)))
    return fac.zeros()  # empty


def simulate_class_set(n: int = 2000, seed: int = 0, n_models: int = 16, good_fraction=(0.25, 0.85),
                       kinds=TRAINING_JUNK_KINDS, models=None, progress=None) -> list[SimulatedClass]:
    """``n`` simulated class averages from simulated classifications (:func:`simulate_run`, numbered in ``run``).

    Each run draws its share of particle classes from ``good_fraction`` and its junk from
    ``kinds``; the last run is cut to make ``n`` classes.
    """
    rng = np.random.default_rng(seed)
    if models is None:
        models = model_pool(n_models, rng)
    out = []
    run = 0
    while len(out) < n:
        done = len(out)
        out += simulate_run(models, np.random.default_rng(rng.integers(0, 2**63 - 1)), kinds, good_fraction, run=run)
        run += 1
        if progress is not None and len(out) // 100 > done // 100:
            progress(min(len(out), n), n)
    return out[:n]


# --------------------------------------------------------------------------- training
def features_of(classes: list[SimulatedClass]) -> pd.DataFrame:
    """Selector features (:func:`conveyor.spa.select.class_features`) of simulated classes, one row each.

    The classes of one run are scored together, as ``conveyor spa select`` scores a
    classification (``contrast_rel`` is relative to the run's other classes).
    """
    from .select import class_features  # noqa: PLC0415

    runs: dict = {}
    for i, c in enumerate(classes):
        runs.setdefault(c.run, []).append(i)
    rows = [None] * len(classes)
    for idx in runs.values():
        cs = [classes[i] for i in idx]
        f = class_features(np.stack([c.average for c in cs]), np.array([c.count for c in cs]),
                           np.array([c.resolution for c in cs]), cs[0].pixel_size, cs[0].mask_diameter)
        for j, i in enumerate(idx):
            rows[i] = f.iloc[j]
    return pd.DataFrame(rows).reset_index(drop=True)


def train_selector(n: int = 2000, seed: int = 0, n_models: int = 16, progress=None) -> dict:
    """Simulate ``n`` classes (seeded), fit the selector and return it as a JSON-ready dict.

    The model is scikit-learn's gradient boosting (shallow trees) on the features of
    :func:`conveyor.spa.select.class_features`, stored as plain trees
    (:func:`conveyor.spa.select.SelectorModel`); the classes of the first fifth of the
    simulated classifications (whole runs, so that no specimen and conditions are shared
    with the training part) are held out to report the accuracy, then the trees are refitted
    on all classes.
    """
    from sklearn.ensemble import GradientBoostingClassifier  # noqa: PLC0415

    from .select import FEATURES, SelectorModel  # noqa: PLC0415

    t0 = time.time()
    classes = simulate_class_set(n, seed=seed, n_models=n_models, progress=progress)
    feats = features_of(classes)
    x = feats[list(FEATURES)].to_numpy(float)
    y = np.array([c.label for c in classes])
    kinds = np.array([c.kind for c in classes])
    runs = np.array([c.run for c in classes])
    n_test = int(np.sum(runs < max(1, (runs.max() + 1) // 5)))  # runs are numbered in order
    clf = GradientBoostingClassifier(n_estimators=150, max_depth=3, learning_rate=0.1, subsample=1.0,
                                     random_state=seed)
    clf.fit(x[n_test:], y[n_test:])
    model = SelectorModel.from_sklearn(clf, FEATURES)
    p = model.predict_proba(x[:n_test])
    acc = float(np.mean((p >= 0.5) == y[:n_test]))
    per_kind = {str(k): float(np.mean((p[kinds[:n_test] == k] >= 0.5) == y[:n_test][kinds[:n_test] == k]))
                for k in sorted(set(kinds[:n_test].tolist()))}
    # refit on everything for the stored model
    clf.fit(x, y)
    model = SelectorModel.from_sklearn(clf, FEATURES)
    import sklearn  # noqa: PLC0415

    out = model.to_dict()
    out["training"] = {"n_classes": int(n), "seed": int(seed), "n_models": int(n_models),
                       "held_out_accuracy": acc, "held_out_accuracy_by_kind": per_kind,
                       "held_out_fraction": n_test / n, "sklearn_version": sklearn.__version__,
                       "seconds": round(time.time() - t0, 1),
                       "command": f"conveyor spa train-selector --n {n} --seed {seed}"}
    log.info("selector trained on %d simulated classes: held-out accuracy %.3f", n, acc)
    return out


def write_selector(path, model: dict) -> None:
    """Write the selector JSON atomically."""
    from ..io.atomic import write_text  # noqa: PLC0415

    write_text(path, json.dumps(model, indent=1, sort_keys=False) + "\n")
