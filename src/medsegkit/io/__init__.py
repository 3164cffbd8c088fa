"""Medical image I/O: NIfTI, NRRD, MetaImage and DICOM series into one :class:`Image` type.

``Image.array`` is in voxel order ``(i, j, k)`` (as nibabel gives it; channels, when several, on the
FIRST axis: ``(C, i, j, k)``) and ``Image.affine`` is the 4×4 voxel → RAS-mm matrix (MONAI's and
nibabel's convention). SimpleITK's ``(k, j, i)`` LPS buffers are converted on the way in and out.

>>> from medsegkit.io import read_image, write_image
>>> img = read_image("t1.nii.gz")             # doctest: +SKIP
>>> img.spacing, img.orientation               # doctest: +SKIP
((2.0, 2.0, 3.0), 'LSA')
>>> write_image(img.array > 50, "mask.nrrd", like=img)   # doctest: +SKIP
"""

from medsegkit.io.core import READ_SUFFIXES, WRITE_SUFFIXES, read_image, write_image
from medsegkit.io.image import Image, affine_from_geometry, same_grid

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "Image",
    "affine_from_geometry",
    "read_image",
    "same_grid",
    "write_image",
]
