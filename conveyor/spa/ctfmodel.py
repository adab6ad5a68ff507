"""The contrast transfer function of a transmission electron microscope (weak-phase approximation).

Conventions
-----------
* Sign: this is the CTF of the *recorded* image, in which protein is dark: it is negative
  at low frequency (-w at k = 0). Extracted particles are contrast-inverted (protein
  white, RELION's convention), and the CTF that applies to them is ``-ctf_2d(...)``,
  positive at low frequency, which is the sign RELION uses. CTF fitting uses CTF² and
  does not care.
* Defocus in Å, positive = underfocus (RELION). ``defocus_u >= defocus_v`` by convention but not required.
* ``defocus_angle`` (degrees) is the angle of the U axis from the +x axis, counter-clockwise.
* Spherical aberration ``cs`` in mm, voltage in kV, phase shift in degrees.
* Spatial frequencies in 1/Å.

CTF(k) = -[ sqrt(1 - w²) sin χ(k) + w cos χ(k) ],
χ(k) = π λ Δf(θ) k² - (π/2) Cs λ³ k⁴ + φ,
Δf(θ) = ½[(Δf_U + Δf_V) + (Δf_U - Δf_V) cos 2(θ - θ_ast)].
"""

from __future__ import annotations

import numpy as np

from .. import backend


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV (300 kV -> 0.019687 Å)."""
    v = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def frequency_grid(shape, pixel_size: float, xp=None, rfft: bool = False):
    """Spatial-frequency components ``(kx, ky)`` in 1/Å for an image of ``shape`` (ny, nx).

    Unshifted FFT layout (origin at [0, 0]); with ``rfft=True`` the x axis has ``nx//2+1``
    entries as for ``rfft2``.
    """
    xp = xp or backend.xp()
    ny, nx = shape
    fy = xp.fft.fftfreq(ny, d=pixel_size)
    fx = xp.fft.rfftfreq(nx, d=pixel_size) if rfft else xp.fft.fftfreq(nx, d=pixel_size)
    ky, kx = xp.meshgrid(fy, fx, indexing="ij")
    return kx, ky


def ctf_2d(
    shape,
    pixel_size: float,
    defocus_u: float,
    defocus_v: float,
    defocus_angle: float,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift: float = 0.0,
    bfactor: float = 0.0,
    rfft: bool = False,
    xp=None,
):
    """The 2D CTF sampled on the FFT grid of an image of ``shape`` (unshifted layout).

    Parameters
    ----------
    shape : (ny, nx)
    pixel_size : float
        Å/px.
    defocus_u, defocus_v : float
        Å, positive = underfocus.
    defocus_angle : float
        Degrees, direction of the U axis from +x.
    voltage : float
        kV.  cs : float, mm.  amplitude_contrast : float, 0..1.
    phase_shift : float
        Degrees (phase plate).
    bfactor : float
        Envelope exp(-B k²/4) in Å² (0: none).
    rfft : bool
        Half-plane layout for ``rfft2``.

    Returns
    -------
    ndarray of shape ``shape`` (or ``(ny, nx//2+1)``), values in [-1, 1].
    """
    xp = xp or backend.xp()
    kx, ky = frequency_grid(shape, pixel_size, xp=xp, rfft=rfft)
    return ctf_at(kx, ky, defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift, bfactor)


def ctf_at(kx, ky, defocus_u, defocus_v, defocus_angle, voltage=300.0, cs=2.7, amplitude_contrast=0.1, phase_shift=0.0, bfactor=0.0):
    """CTF at frequency components ``kx, ky`` (1/Å, any shape); parameters as in :func:`ctf_2d`."""
    xp = backend.array_module(kx)
    lam = electron_wavelength(voltage)
    k2 = kx * kx + ky * ky
    theta = xp.arctan2(ky, kx)
    ang = np.deg2rad(defocus_angle)
    dz = 0.5 * ((defocus_u + defocus_v) + (defocus_u - defocus_v) * xp.cos(2.0 * (theta - ang)))
    cs_a = cs * 1e7
    chi = np.pi * lam * dz * k2 - 0.5 * np.pi * cs_a * lam**3 * k2 * k2 + np.deg2rad(phase_shift)
    w = amplitude_contrast
    c = -(np.sqrt(1.0 - w * w) * xp.sin(chi) + w * xp.cos(chi))
    if bfactor:
        c = c * xp.exp(-bfactor * k2 / 4.0)
    return c
