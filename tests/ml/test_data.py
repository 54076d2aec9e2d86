"""ml.data: every reader on small real files, the size/channel rules, the cache, hostile input."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.data import DataError, ImageSet, Limits, conform_images, decode_image, load_source

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- builders of real files


def pattern(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A smooth image (so JPEG round-trips closely) that differs by seed."""
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * (3 + seed + c) + y * (5 + 2 * c) + 40 * seed) % 256 for c in range(channels)]
    return np.stack(planes, -1).astype(np.uint8)


def save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path, **kw)
    return path


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """cats/ (2 png) and dogs/ (1 png + 1 jpg), all 12x12 RGB, plus OS junk to ignore."""
    root = tmp_path / "animals"
    save(root / "cats" / "a.png", pattern(12, 12, 0))
    save(root / "cats" / "b.png", pattern(12, 12, 1))
    save(root / "dogs" / "c.png", pattern(12, 12, 2))
    save(root / "dogs" / "d.jpg", pattern(12, 12, 3), quality=95)
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / "dogs" / "Thumbs.db").write_bytes(b"junk")
    (root / "README.txt").write_text("not an image, not in a class folder: ignored")
    return root


def zip_folder(root: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(root).as_posix())
        zf.writestr("__MACOSX/cats/._a.png", b"resource fork junk")
    return dest


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx_dir(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, idx, arr in (("images", "idx3", images), ("labels", "idx1", labels)):
        data = idx_bytes(arr)
        name = f"{prefix}-{kind}-{idx}-ubyte"
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)


# ---------------------------------------------------------------- folders and archives


def test_class_folder_gives_labels_and_class_names(class_folder):
    s = load_source(class_folder)
    assert s.images.dtype == np.uint8 and s.images.shape == (4, 3, 12, 12)
    assert s.images.flags.c_contiguous
    assert s.class_names == ["cats", "dogs"]
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [0, 0, 1, 1]
    assert (s.n, s.channels, s.height, s.width) == (4, 3, 12, 12)
    # same-size PNGs are not resized: pixels are exactly the file's
    assert np.array_equal(s.images[0].transpose(1, 2, 0), pattern(12, 12, 0))
    jpg = np.asarray(Image.open(class_folder / "dogs" / "d.jpg").convert("RGB"))
    assert np.array_equal(s.images[3].transpose(1, 2, 0), jpg)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        save(tmp_path / "flat" / f"{i}.png", pattern(10, 10, i))
    s = load_source(tmp_path / "flat")
    assert s.labels is None and s.class_names is None and s.images.shape == (3, 3, 10, 10)


def test_mixed_sizes_follow_the_size_rule(tmp_path):
    # shorter sides 20, 30, 25, 50, 60 -> median 30: every image 30x30
    for i, (h, w) in enumerate([(20, 40), (30, 30), (60, 25), (50, 80), (90, 60)]):
        save(tmp_path / "mixed" / f"{i}.png", pattern(h, w, i))
    s = load_source(tmp_path / "mixed")
    assert s.images.shape == (5, 3, 30, 30)
    assert np.array_equal(s.images[1].transpose(1, 2, 0), pattern(30, 30, 1))  # right size: untouched
    capped = load_source(tmp_path / "mixed", limits=Limits(max_side=16))
    assert capped.images.shape == (5, 3, 16, 16)
    forced = load_source(tmp_path / "mixed", image_size=24)
    assert forced.images.shape == (5, 3, 24, 24)


def test_tiny_images_are_raised_to_eight_pixels(tmp_path):
    save(tmp_path / "tiny" / "a.png", pattern(4, 4, 0))
    save(tmp_path / "tiny" / "b.png", pattern(6, 5, 1))
    assert load_source(tmp_path / "tiny").images.shape == (2, 3, 8, 8)


def test_gray_and_rgb_mix_gives_three_channels(tmp_path):
    gray = pattern(16, 16, 0, channels=1)
    save(tmp_path / "mix" / "a_gray.png", gray)
    save(tmp_path / "mix" / "b_rgb.png", pattern(16, 16, 1))
    s = load_source(tmp_path / "mix")
    assert s.images.shape == (2, 3, 16, 16)
    for c in range(3):  # gray replicated into every channel
        assert np.array_equal(s.images[0, c], gray[:, :, 0])
    only_gray = tmp_path / "gray"
    save(only_gray / "a.png", gray)
    save(only_gray / "b.jpg", pattern(16, 16, 2, channels=1))
    assert load_source(only_gray).images.shape == (2, 1, 16, 16)


def test_rgba_palette_and_16_bit_are_converted(tmp_path):
    root = tmp_path / "modes"
    rgba = np.dstack([pattern(10, 10, 0), np.full((10, 10, 1), 128, np.uint8)])
    save(root / "rgba.png", rgba)
    Image.fromarray(pattern(10, 10, 1)).convert("P").save(root / "pal.png")
    sixteen = pattern(10, 10, 2, channels=1)[:, :, 0].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(root / "z16.png")
    s = load_source(root)
    assert s.images.shape == (3, 3, 10, 10)
    assert np.array_equal(s.images[1].transpose(1, 2, 0), pattern(10, 10, 0))  # alpha dropped
    palette = np.asarray(Image.open(root / "pal.png").convert("RGB"))
    assert np.array_equal(s.images[0].transpose(1, 2, 0), palette)
    assert np.array_equal(s.images[2, 1], pattern(10, 10, 2, channels=1)[:, :, 0])  # /257


def test_conform_images_matches_ingest(tmp_path):
    sizes = [(20, 36), (30, 30), (45, 33)]
    for i, (h, w) in enumerate(sizes):
        save(tmp_path / "set" / f"{i}.png", pattern(h, w, i))
    save(tmp_path / "set" / "3.png", pattern(40, 25, 3, channels=1))
    s = load_source(tmp_path / "set")
    assert s.images.shape == (4, 3, 27, 27)  # median of 20, 25, 30, 33 = 27.5 -> 27
    for i in range(4):
        raw = (tmp_path / "set" / f"{i}.png").read_bytes()
        decoded = decode_image(raw, f"{i}.png")
        assert decoded.dtype == np.uint8 and decoded.shape[2] == (1 if i == 3 else 3)
        again = conform_images([decoded], (27, 27), 3)
        assert np.array_equal(again[0], s.images[i])


def test_an_archive_read_twice_in_small_batches_gives_the_same_set(tmp_path, monkeypatch):
    """Small archives keep their members' bytes from the header pass; larger ones are read again
    for the decode pass, batch by batch (bounded memory): the pixels must not depend on which."""
    import ml.data.encoded as encoded

    for i, (h, w) in enumerate([(20, 36), (30, 30), (45, 33)]):
        save(tmp_path / "set" / f"{i}.png", pattern(h, w, i))
    save(tmp_path / "set" / "3.jpg", pattern(40, 25, 3, channels=1))
    for kind in ("zip", "gztar"):
        archive = shutil.make_archive(str(tmp_path / f"set-{kind}"), kind, tmp_path / "set")
        monkeypatch.setattr(encoded, "KEEP_BYTES", encoded.KEEP_BYTES)
        monkeypatch.setattr(encoded, "BATCH_ITEMS", encoded.BATCH_ITEMS)
        kept = load_source(archive)
        monkeypatch.setattr(encoded, "KEEP_BYTES", 0)  # nothing kept: the decode pass reads again
        monkeypatch.setattr(encoded, "BATCH_ITEMS", 1)
        read_twice = load_source(archive)
        assert read_twice.images.shape == (4, 3, 27, 27)
        assert np.array_equal(kept.images, read_twice.images)
        assert np.array_equal(kept.images, load_source(tmp_path / "set").images)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    Image.fromarray(pattern(10, 20, 0)).save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue(), "photo.jpg").shape == (20, 10, 3)


def test_conform_images_to_one_channel_takes_luma():
    rgb = pattern(12, 20, 5)
    out = conform_images([rgb, rgb[:, :, :1]], (6, 6), 1)
    assert out.shape == (2, 1, 6, 6) and out.dtype == np.uint8
    expected = np.asarray(
        Image.fromarray(rgb).resize((10, 6), Image.Resampling.BICUBIC).crop((2, 0, 8, 6)).convert("L")
    )
    assert np.array_equal(out[0, 0], expected)


def test_zip_and_tar_gz_equal_the_folder(class_folder, tmp_path):
    expected = load_source(class_folder)
    # a wrapper folder inside the archive is looked through
    archives = [
        zip_folder(class_folder, tmp_path / "a.zip", prefix="animals/"),
        zip_folder(class_folder, tmp_path / "flat.zip"),
    ]
    for suffix, mode, arcname in ((".tar.gz", "w:gz", "animals"), (".tgz", "w:gz", "."), (".tar", "w", "animals")):
        path = tmp_path / f"a{suffix}"
        with tarfile.open(path, mode) as tf:
            tf.add(class_folder, arcname=arcname)  # "." gives members named ./cats/a.png
        archives.append(path)
    for path in archives:
        s = load_source(path)
        assert np.array_equal(s.images, expected.images), path
        assert s.labels.tolist() == expected.labels.tolist()
        assert s.class_names == expected.class_names
        assert s.source == str(path)


def test_archives_and_npz_without_suffix_are_recognised_by_content(class_folder, tmp_path):
    expected = load_source(class_folder)
    upload = tmp_path / "upload-1"
    upload.write_bytes(zip_folder(class_folder, tmp_path / "x.zip").read_bytes())
    assert np.array_equal(load_source(upload).images, expected.images)
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tf:
        tf.add(class_folder, arcname="animals")
    upload.write_bytes((tmp_path / "x.tar.gz").read_bytes())
    assert load_source(upload).class_names == ["cats", "dogs"]
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 5, 5), np.uint8))
    upload.write_bytes((tmp_path / "x.npz").read_bytes())
    assert load_source(upload).images.shape == (2, 1, 5, 5)
    upload.write_text("just text")
    assert_data_error(lambda: load_source(upload), "upload-1", match="unknown source type")


def test_split_folders_pick_the_split(tmp_path):
    root = tmp_path / "splits"
    save(root / "train" / "a" / "1.png", pattern(8, 8, 0))
    save(root / "train" / "b" / "2.png", pattern(8, 8, 1))
    save(root / "test" / "b" / "3.png", pattern(8, 8, 2))
    train = load_source(root)
    assert train.n == 2 and train.class_names == ["a", "b"]
    test = load_source(root, split="test")  # class indices shared with train
    assert test.n == 1 and test.class_names == ["a", "b"] and test.labels.tolist() == [1]
    assert np.array_equal(test.images[0].transpose(1, 2, 0), pattern(8, 8, 2))
    assert_data_error(lambda: load_source(root, split="unlabeled"), "splits", match="no folder")


# ---------------------------------------------------------------- array formats


def test_npz_nhwc_nchw_and_nhw(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 9, 9, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "a.npz", images=nhwc, labels=labels, class_names=np.array(["x", "y", "z"]))
    np.savez_compressed(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "c.npz", images=nhwc[..., 0].astype(np.float32) / 255)
    a = load_source(tmp_path / "a.npz")
    assert np.array_equal(a.images, nhwc.transpose(0, 3, 1, 2))
    assert a.labels.tolist() == labels.tolist() and a.class_names == ["x", "y", "z"]
    b = load_source(tmp_path / "b.npz")
    assert np.array_equal(b.images, a.images) and b.labels is None
    c = load_source(tmp_path / "c.npz")
    assert c.images.shape == (5, 1, 9, 9) and np.array_equal(c.images[:, 0], nhwc[..., 0])


def test_same_size_arrays_above_max_side_are_resized(tmp_path):
    np.savez(tmp_path / "wide.npz", images=np.full((2, 20, 30), 7, np.uint8))
    s = load_source(tmp_path / "wide.npz", limits=Limits(max_side=10))
    assert s.images.shape == (2, 1, 10, 10) and (s.images == 7).all()
    assert load_source(tmp_path / "wide.npz").images.shape == (2, 1, 20, 30)  # kept as they are


def test_idx_gz_and_plain(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, 7).astype(np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    test_y = np.array([9, 0, 4], np.uint8)
    for gz in (True, False):
        d = tmp_path / ("gz" if gz else "plain")
        write_idx_dir(d, "train", train, train_y, gz)
        write_idx_dir(d, "t10k", test, test_y, gz)
        s = load_source(d)
        assert s.images.shape == (7, 1, 28, 28) and np.array_equal(s.images[:, 0], train)
        assert s.labels.tolist() == train_y.tolist()
        t = load_source(d, split="test")
        assert np.array_equal(t.images[:, 0], test) and t.labels.tolist() == [9, 0, 4]
    single = load_source(tmp_path / "plain" / "t10k-images-idx3-ubyte")  # labels found beside it
    assert single.labels.tolist() == [9, 0, 4]


def _cifar_rows(images_nchw: np.ndarray) -> np.ndarray:
    return images_nchw.reshape(len(images_nchw), -1)  # R plane, G plane, B plane, row-major


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    chunks = [rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8) for _ in range(3)]
    for i, chunk in enumerate(chunks[:2], 1):  # python-2 style: bytes keys, protocol 2
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(
                {b"data": _cifar_rows(chunk), b"labels": [i, i + 1, 0, 9], b"filenames": [b"x.png"] * 4}, f, protocol=2
            )
    with open(d / "test_batch", "wb") as f:  # python-3 style: str keys, newest protocol
        pickle.dump({"data": _cifar_rows(chunks[2]), "labels": [3, 3, 3, 3]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    s = load_source(tmp_path)  # the wrapper folder is looked through
    assert s.images.shape == (8, 3, 32, 32)
    assert np.array_equal(s.images, np.concatenate(chunks[:2]))
    assert s.labels.tolist() == [1, 2, 0, 9, 2, 3, 0, 9] and s.class_names[3] == "c3"
    t = load_source(d, split="test")
    assert np.array_equal(t.images, chunks[2]) and t.labels.tolist() == [3] * 4


def test_cifar100_coarse_by_default_fine_on_request(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    coarse, fine = [0, 19, 5, 5, 7, 1], [0, 99, 42, 43, 3, 10]
    for split in ("train", "test"):
        with open(d / split, "wb") as f:
            pickle.dump({b"data": _cifar_rows(images), b"fine_labels": fine, b"coarse_labels": coarse}, f, protocol=2)
    s = load_source(d)
    assert s.labels.tolist() == coarse and len(s.class_names) == 20
    assert s.class_names[0] == "aquatic_mammals" and np.array_equal(s.images, images)
    f = load_source(d, split="test-fine")
    assert f.labels.tolist() == fine and len(f.class_names) == 100


def test_stl10_binaries(tmp_path):
    rng = np.random.default_rng(4)
    chw = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    # STL-10 stores each channel column-major
    (tmp_path / "train_X.bin").write_bytes(np.ascontiguousarray(chw.transpose(0, 1, 3, 2)).tobytes())
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    (tmp_path / "unlabeled_X.bin").write_bytes(np.ascontiguousarray(chw[:2].transpose(0, 1, 3, 2)).tobytes())
    (tmp_path / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    s = load_source(tmp_path)
    assert np.array_equal(s.images, chw) and s.labels.tolist() == [0, 9, 3]
    assert s.class_names[9] == "k9"
    u = load_source(tmp_path, split="unlabeled")
    assert u.labels is None and np.array_equal(u.images, chw[:2])


# ---------------------------------------------------------------- builtins


def test_digits_builtin():
    s = load_source("digits")
    assert s.images.shape == (1797, 1, 8, 8) and s.images.dtype == np.uint8
    assert s.images.max() == 255 and s.class_names == [str(i) for i in range(10)]
    assert sorted(set(s.labels.tolist())) == list(range(10))
    assert load_source("digits", split="test").n == 1797


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason="Debian dataset-fashion-mnist is not installed "
    "(`make fashion-mnist`, or apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_builtin():
    s = load_source("fashion-mnist", split="test")
    assert s.images.shape == (10000, 1, 28, 28) and s.class_names[9] == "Ankle boot"
    assert np.bincount(s.labels).tolist() == [1000] * 10


def test_missing_builtin_files_say_how_to_install(monkeypatch):
    import ml.data.builtin as builtin

    monkeypatch.setattr(builtin, "FASHION_MNIST_DIRS", (Path("/nonexistent/fashion-mnist"),))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist")


# ---------------------------------------------------------------- cache


def test_cache_is_reused_without_decoding(class_folder, tmp_path):
    cache = tmp_path / "cache"
    first = load_source(class_folder, cache_dir=cache)
    (entry,) = list(cache.iterdir())
    images_file = entry / "images.npy"
    mtime = images_file.stat().st_mtime_ns
    assert isinstance(first.images, np.memmap)
    # Corrupting a source image proves the second load does not decode: it would raise.
    load_source(class_folder, cache_dir=cache, image_size=8)  # another size is another entry
    assert len(list(cache.iterdir())) == 2
    victim = class_folder / "cats" / "a.png"
    st = victim.stat()
    victim.write_bytes(b"garbage" + victim.read_bytes()[7:])
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_source(class_folder, cache_dir=cache)
    assert np.array_equal(second.images, first.images)
    assert second.labels.tolist() == first.labels.tolist() and second.class_names == first.class_names
    assert images_file.stat().st_mtime_ns == mtime
    assert len(list(cache.iterdir())) == 2  # no temp dirs left
    os.utime(victim)  # an edited source is decoded again
    with pytest.raises(DataError, match="a.png"):
        load_source(class_folder, cache_dir=cache)


def test_imageset_save_load_round_trip_and_replace(tmp_path):
    s = ImageSet(np.zeros((2, 1, 4, 4), np.uint8), np.array([1, 0]), ["a", "b"], "test")
    s.save(tmp_path / "set")
    s2 = ImageSet(np.ones((3, 3, 2, 2), np.uint8), None, None, "other")
    s2.save(tmp_path / "set")  # replaces the old one whole
    back = ImageSet.load(tmp_path / "set")
    assert back.images.shape == (3, 3, 2, 2) and back.labels is None and back.source == "other"
    assert not (tmp_path / "set" / "labels.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# ---------------------------------------------------------------- hostile input


def assert_data_error(fn, *names: str, match: str | None = None) -> DataError:
    with pytest.raises(DataError) as info:
        fn()
    e = info.value
    assert str(e) == f"{e.path}: {e.reason}"
    for name in names:
        assert name in str(e), (name, str(e))
    if match:
        assert match in e.reason.lower(), e.reason
    return e


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_png(tmp_path):
    root = tmp_path / "bad"
    save(root / "good.png", pattern(8, 8, 0))
    data = _png_bytes(pattern(64, 64, 1))
    (root / "broken.png").write_bytes(data[: len(data) // 2])
    assert_data_error(lambda: load_source(root), "broken.png", match="corrupt")


def test_text_renamed_png(tmp_path):
    root = tmp_path / "bad"
    save(root / "good.png", pattern(8, 8, 0))
    (root / "notes.png").write_text("hello, I am text")
    assert_data_error(lambda: load_source(root), "notes.png", match="not an image")
    assert_data_error(lambda: decode_image(b"hello", "upload.png"), "upload.png", match="not an image")


def _zip_with(path: Path, name: str, data: bytes, attr: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.png", _png_bytes(pattern(8, 8, 0)))
        info = zipfile.ZipInfo(name)
        if attr is not None:
            info.external_attr = attr << 16
        zf.writestr(info, data)
    return path


def test_zip_path_traversal_and_absolute_paths(tmp_path):
    png = _png_bytes(pattern(8, 8, 1))
    assert_data_error(
        lambda: load_source(_zip_with(tmp_path / "dots.zip", "../evil.png", png)),
        "dots.zip",
        "../evil.png",
        match="outside",
    )
    assert_data_error(
        lambda: load_source(_zip_with(tmp_path / "abs.zip", "/etc/evil.png", png)),
        "abs.zip",
        "/etc/evil.png",
        match="absolute",
    )
    assert not (tmp_path.parent / "evil.png").exists()


def test_tar_path_traversal_and_device_entries(tmp_path):
    for name, kind, match in (("../evil.png", tarfile.REGTYPE, "outside"), ("imgs/dev.png", tarfile.CHRTYPE, "device")):
        path = tmp_path / f"{kind.decode()}.tar"
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo(name)
            info.type = kind
            tf.addfile(info, io.BytesIO(b""))
        assert_data_error(lambda path=path: load_source(path), path.name, name, match=match)


def test_zip_symlink(tmp_path):
    z = _zip_with(tmp_path / "link.zip", "link.png", b"/etc/passwd", attr=stat.S_IFLNK | 0o777)
    assert_data_error(lambda: load_source(z), "link.zip", match="symbolic link")


def _tar_with_link(path: Path, kind: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        data = _png_bytes(pattern(8, 8, 0))
        info = tarfile.TarInfo("imgs/ok.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("imgs/link.png")
        link.type = kind
        link.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "imgs/ok.png"
        tf.addfile(link)
    return path


def test_tar_symlink_and_hardlink(tmp_path):
    assert_data_error(
        lambda: load_source(_tar_with_link(tmp_path / "sym.tar.gz", tarfile.SYMTYPE)),
        "sym.tar.gz",
        "link.png",
        match="symbolic link",
    )
    assert_data_error(
        lambda: load_source(_tar_with_link(tmp_path / "hard.tgz", tarfile.LNKTYPE)),
        "hard.tgz",
        "link.png",
        match="hard link",
    )


def test_folder_symlink(tmp_path):
    root = tmp_path / "imgs"
    save(root / "ok.png", pattern(8, 8, 0))
    os.symlink(root / "ok.png", root / "link.png")
    assert_data_error(lambda: load_source(root), "link.png", match="symbolic link")


def test_zip_bomb_checked_before_reading(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * 2_000_000)  # compresses to ~2 kB
    assert z.stat().st_size < 20_000
    assert_data_error(
        lambda: load_source(z, limits=Limits(max_total_bytes=1_000_000)), "bomb.zip", match="uncompressed size"
    )
    t = tmp_path / "bomb.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.png")
        info.size = 2_000_000
        tf.addfile(info, io.BytesIO(b"\0" * 2_000_000))
    assert_data_error(
        lambda: load_source(t, limits=Limits(max_total_bytes=1_000_000)), "bomb.tar.gz", match="uncompressed size"
    )


def test_too_many_files(class_folder, tmp_path):
    z = zip_folder(class_folder, tmp_path / "many.zip")
    assert_data_error(lambda: load_source(z, limits=Limits(max_files=3)), "many.zip", match="limit")


def test_too_many_pixels(tmp_path):
    root = tmp_path / "big"
    save(root / "huge.png", pattern(100, 100, 0))
    assert_data_error(
        lambda: load_source(root, limits=Limits(max_image_pixels=5000)), "huge.png", match="decompression bomb"
    )
    raw = (root / "huge.png").read_bytes()
    assert_data_error(lambda: decode_image(raw, "up.png", Limits(max_image_pixels=5000)), "up.png")


def test_empty_zip_and_empty_folder(tmp_path):
    z = tmp_path / "empty.zip"
    zipfile.ZipFile(z, "w").close()
    assert_data_error(lambda: load_source(z), "empty.zip", match="no images")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert_data_error(lambda: load_source(tmp_path / "empty"), "empty", match="no images")


def test_npz_without_images_and_label_mismatch(tmp_path):
    np.savez(tmp_path / "noimg.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    assert_data_error(lambda: load_source(tmp_path / "noimg.npz"), "noimg.npz", match="'images'")
    np.savez(tmp_path / "mismatch.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1]))
    assert_data_error(lambda: load_source(tmp_path / "mismatch.npz"), "mismatch.npz", match="does not match")


def test_truncated_and_bad_idx(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    data = idx_bytes(images)
    (tmp_path / "cut-images-idx3-ubyte").write_bytes(data[:-100])
    assert_data_error(
        lambda: load_source(tmp_path / "cut-images-idx3-ubyte"), "cut-images-idx3-ubyte", match="truncated"
    )
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data[:-100]))
    assert_data_error(lambda: load_source(tmp_path / "cut.gz"), "cut.gz", match="truncated")
    huge = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    (tmp_path / "huge-images-idx3-ubyte").write_bytes(huge + b"\0" * 64)
    # Refused from the header, before a byte of data is read (it would also be truncated).
    assert_data_error(lambda: load_source(tmp_path / "huge-images-idx3-ubyte"), "huge", match="decodes to")
    d = tmp_path / "badmagic"
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(b"\x12\x34" + data[2:])
    assert_data_error(lambda: load_source(d), "train-images-idx3-ubyte", match="magic")


def test_hostile_pickle_is_refused(tmp_path):
    d = tmp_path / "cifar"
    d.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    assert_data_error(lambda: load_source(d), "data_batch_1", match="cifar pickle")
    assert not marker.exists()
