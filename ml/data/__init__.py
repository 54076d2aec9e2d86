"""The data layer: every source becomes one uint8 ``(N, C, H, W)`` array (`ImageSet`).

Sources (`load_source`): the builtins ``digits`` and ``fashion-mnist``; a folder of images
(.png/.jpg/.jpeg/.webp/.bmp), where one subfolder per class gives ground-truth labels (used only for
evaluation) and a flat folder is unlabelled; a .zip/.tar/.tar.gz/.tgz of such a folder (read in
memory, never extracted; single top-level wrapper folders are looked through); .npz (``images`` as
NHWC/NCHW/NHW, optional ``labels`` and ``class_names``); IDX files or a directory of them (MNIST
naming); CIFAR-10/100 python folders (CIFAR-100 gives its 20 superclasses unless the split carries
the suffix ``-fine``, e.g. ``"train-fine"``); STL-10 binary folders (split ``"unlabeled"`` too).
Sources without splits give the same images for every split: ``digits`` (all 1797 images for both
"train" and "test"), .npz files, single IDX files, and folders without ``train/``/``test/`` subfolders.

Size rule. A set whose images all have the same size keeps it, unless a side is above
``Limits.max_side``. Otherwise every image becomes S x S with S = the median of the images' shorter
sides, capped at ``Limits.max_side`` (256) and at least 8 (``image_size`` forces S). Each image
(turned upright by its EXIF orientation first) is scaled, keeping its aspect ratio, so that its
shorter side is S (PIL bicubic, antialiased when shrinking), then centre-cropped to S x S; for a
non-square target H x W it is scaled just enough to cover H x W. `conform_images` applies exactly
this to new images (for /predict), and `resize_to` to whole uint8 batches when a run's
``image_size`` differs from the set's (training, evaluation, `Predictor`): one resize rule everywhere.

Channel rule. If every image is grayscale (decoded mode 1, L, LA or 16-bit gray) the set has C=1;
otherwise C=3 and gray images are replicated into three channels. Palette, RGBA, CMYK and other modes
are converted to RGB (alpha is dropped); 16-bit values are scaled to 8 bits (divided by 257). A new
colour image conformed to a C=1 set is reduced to its luma (PIL's "L" conversion).

Hostile or unreadable input raises `DataError` (``str(e) == f"{path}: {reason}"``): corrupt or
non-image files, decompression bombs (``Limits.max_image_pixels``), archive entries outside the root,
links or devices in archives or folders, archives over ``Limits.max_total_bytes`` (declared size,
checked before reading) or ``Limits.max_files``, empty sources, malformed npz/IDX/CIFAR/STL files.
"""

from .bad_input import DataError, Limits
from .imageset import ImageSet
from .imaging import conform_images, decode_conformed, decode_image, resize_to
from .load import load_source

__all__ = [
    "DataError",
    "ImageSet",
    "Limits",
    "conform_images",
    "decode_conformed",
    "decode_image",
    "load_source",
    "resize_to",
]
