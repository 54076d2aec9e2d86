"""Peak memory of an ingest, per hostile and per normal upload, as a ratio to the decoded size.

Each case is decoded by `ml.data.load_source` (what the `cpu` worker runs) in a fresh process; the
process's RSS after the imports is the baseline, the peak is reset there (Linux clear_refs) and read
after the ingest, and the growth is printed next to the decoded size. Refused cases print their
answer: the point is that a refusal costs a few MB, not the gigabytes the file declares.

    .venv/bin/python bench/ingest_memory.py            # about a minute on 2 busy cores
    .venv/bin/python bench/ingest_memory.py --limit-mb 256

The hostile files are built in a temporary folder: a compressed npz and a gzipped IDX declaring
4x the limit (all zeros, so they compress to KBs), a zip whose one member inflates to 1 GiB, and an
npz with labels [0, 1, 2, 10_000_000]. The normal ones: an npz of random images, zips of 2,000 and
8,000 PNGs and a tar.gz of 2,000 (images are decoded straight into the preallocated array, members
read in batches of at most 16 MiB: the growth is the decoded size plus a fixed margin).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys
from ml.data import DataError, Limits, load_source

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

# Reset the high-water mark after the imports (Linux: "5" to clear_refs), so the peak is the ingest's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
out = {"base_kb": status_kb("VmRSS")}
try:
    s = load_source(sys.argv[1], limits=Limits(max_decoded_bytes=int(sys.argv[2])))
    out.update(ok=True, decoded=int(s.images.nbytes), classes=len(s.class_names or []))
except DataError as e:
    out.update(ok=False, error=str(e).split(": ", 1)[-1][:90])
out["peak_kb"] = status_kb("VmHWM")
print(json.dumps(out))
"""


def build_cases(folder: Path, limit: int) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(0)
    cases = []

    def npz(name: str, compressed: bool = False, **arrays) -> Path:
        path = folder / name
        (np.savez_compressed if compressed else np.savez)(path, **arrays)
        return path

    cases.append(
        (
            "normal: npz 20000 x 32x32x3",
            npz("normal.npz", images=rng.integers(0, 256, (20_000, 32, 32, 3), dtype=np.uint8)),
        )
    )
    from PIL import Image

    pngs = []
    for i in range(8000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append((f"c{i % 10}/{i}.png", buf.getvalue()))
    for count in (2000, 8000):
        zpath = folder / f"pngs-{count}.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            for name, data in pngs[:count]:
                zf.writestr(name, data)
        cases.append((f"normal: zip of {count} PNGs 64x64", zpath))
    tpath = folder / "pngs-2000.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        for name, data in pngs[:2000]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cases.append(("normal: tar.gz of 2000 PNGs 64x64", tpath))

    side = 1024
    n = 4 * limit // (side * side)
    cases.append(
        (
            f"hostile: compressed npz declaring {n * side * side >> 20} MiB",
            npz("bomb.npz", compressed=True, images=np.zeros((n, side, side), np.uint8)),
        )
    )
    n = 4 * limit // (28 * 28)
    ipath = folder / "train-images-idx3-ubyte.gz"
    with gzip.open(ipath, "wb", compresslevel=1) as gz:
        gz.write(bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in (n, 28, 28)))
        chunk = bytes(1 << 22)
        for _ in range(n * 28 * 28 // len(chunk) + 1):
            gz.write(chunk)
    cases.append((f"hostile: gzipped IDX declaring {n * 784 >> 20} MiB", ipath))
    bpath = folder / "member-bomb.zip"
    with zipfile.ZipFile(bpath, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("c0/huge.png", "w", force_zip64=True) as f:
            chunk = bytes(1 << 22)
            for _ in range(256):  # 1 GiB of zeros
                f.write(chunk)
    cases.append(("hostile: zip member inflating to 1 GiB", bpath))
    cases.append(
        (
            "hostile: npz labels [0,1,2,10_000_000]",
            npz("sparse.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 10_000_000])),
        )
    )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-mb", type=int, default=256, help="SCAN_MAX_DATASET_BYTES for the run")
    args = parser.parse_args()
    limit = args.limit_mb << 20
    with tempfile.TemporaryDirectory() as tmp:
        cases = build_cases(Path(tmp), limit)
        print(f"decoded-size limit {args.limit_mb} MiB; growth = peak RSS during the ingest - RSS after imports")
        print(f"{'case':46} {'file':>9} {'decoded':>9} {'growth':>9} {'ratio':>6}  answer")
        for name, path in cases:
            r = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path), str(limit)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            out = json.loads(r.stdout.strip().splitlines()[-1])
            growth = (out["peak_kb"] - out["base_kb"]) * 1024
            decoded = out.get("decoded")
            ratio = f"{growth / decoded:6.2f}" if decoded and decoded >= 1 << 20 else "     -"
            answer = f"ok ({out['classes']} classes)" if out["ok"] else f"422 {out['error']}"
            print(
                f"{name:46} {path.stat().st_size / 2**20:8.1f}M "
                f"{(decoded or 0) / 2**20:8.1f}M {growth / 2**20:8.1f}M {ratio}  {answer}"
            )


if __name__ == "__main__":
    main()
