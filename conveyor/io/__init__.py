"""File I/O: MRC/MRCS, TIFF movies, RELION 3.1+ STAR, CXI/HDF5. One implementation each."""
