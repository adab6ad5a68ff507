"""Conveyor: single-particle cryo-EM (SPA) and XFEL (SPI) processing, from raw data to 3D.

The package holds the science (pure functions over numpy/cupy arrays), file I/O
(MRC/MRCS, TIFF, RELION 3.1+ STAR, CXI/HDF5), simulators with known ground truth and
the ``conveyor`` command-line interface. It never imports Snakemake.
"""

__version__ = "0.1.0"
