"""Synthetic images for the bundled sample set: small procedural pictures, one look per modality.

    python -m medix_fast.demo.sample_images --out medix_fast/data/sample

Writes ``images/<tag>_<k>.png`` (64x64 RGB, drawn with numpy from a seeded generator: no real
patient data) for the first ``PER_MODALITY`` train items of each of the 16 modality tags, and
``train_vl.jsonl``: those items with an ``image`` column holding the PNG's path relative to
the JSONL file. Each modality has its own palette and pattern (grey chest-like ellipses for
x-ray, pink cell blobs for microscopy, a round orange fundus, ...), so the images carry a
learnable modality signal. Byte-identical on rerun.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from medix_fast.data.prompt import MODALITY_TAGS, split_solution
from medix_fast.data.loader import SAMPLE_DIR as DATA_DIR, sample_path
from medix_fast.errors import ArgumentParser, UserError, run_command

SIZE, PER_MODALITY, SEED = 64, 2, 20240612
# (background RGB, foreground RGB, pattern) per tag; patterns: ellipse, blobs, ring, stripes, grid, noise
STYLE = {
    "<X_RAY>": ((10, 10, 10), (200, 200, 200), "ellipse"), "<MICROSCOPY>": ((240, 200, 220), (120, 40, 140), "blobs"),
    "<CLINICAL_PHOTOGRAPHY>": ((210, 160, 130), (150, 60, 50), "blobs"),
    "<CT_SCAN>": ((0, 0, 0), (160, 160, 160), "ring"), "<GRAPHICS>": ((255, 255, 255), (30, 60, 200), "grid"),
    "<ANGIOGRAPHY>": ((180, 180, 180), (20, 20, 20), "stripes"), "<PET_SCAN>": ((0, 0, 40), (255, 120, 0), "blobs"),
    "<ULTRASOUND>": ((0, 0, 0), (120, 120, 120), "noise"), "<MRI_SCAN>": ((5, 5, 5), (230, 230, 230), "ring"),
    "<FUNDUS_PHOTOGRAPHY>": ((0, 0, 0), (220, 110, 30), "ellipse"), "<OCT_SCAN>": ((0, 0, 0), (200, 200, 200), "stripes"),
    "<ENDOSCOPY>": ((120, 20, 20), (240, 150, 140), "ring"), "<MAMMOGRAPHY>": ((0, 0, 0), (210, 210, 210), "noise"),
    "<FLUOROSCOPY>": ((90, 90, 90), (20, 20, 20), "ellipse"), "<OTHER>": ((60, 120, 60), (230, 230, 40), "grid"),
    "<SPECT>": ((0, 0, 0), (255, 40, 40), "noise"),
}


def draw(tag: str, rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 picture in the style of ``tag``, varied by ``rng``."""
    bg, fg, pattern = STYLE[tag]
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE  # (S, S) each
    cx, cy = rng.uniform(0.35, 0.65, 2)
    r = np.hypot(x - cx, y - cy)  # (S, S)
    if pattern == "ellipse":
        mask = ((x - cx) / 0.35) ** 2 + ((y - cy) / 0.45) ** 2 < 1
    elif pattern == "ring":
        mask = np.abs(r - rng.uniform(0.25, 0.4)) < 0.06
    elif pattern == "stripes":
        mask = np.sin((x * rng.uniform(0.5, 1.5) + y) * rng.uniform(15, 30)) > 0.3
    elif pattern == "grid":
        mask = (np.sin(x * 40) > 0.8) | (np.sin(y * 40) > 0.8)
    elif pattern == "blobs":
        centres = rng.uniform(0.1, 0.9, (6, 2))
        mask = np.min(np.hypot(x[..., None] - centres[:, 0], y[..., None] - centres[:, 1]), -1) < 0.08
    else:  # noise: speckle inside a fan / disc
        mask = (r < 0.45) & (rng.uniform(size=(SIZE, SIZE)) < 0.5)
    shade = (0.75 + 0.25 * rng.uniform(size=(SIZE, SIZE)))[..., None]  # (S, S, 1)
    image = np.where(mask[..., None], np.array(fg) * shade, np.array(bg))  # (S, S, 3)
    return image.clip(0, 255).astype(np.uint8)


def write_vl_sample(out: pathlib.Path = DATA_DIR, seed: int = SEED) -> pathlib.Path:
    """Write the images and ``train_vl.jsonl`` under ``out``; returns the JSONL path."""
    from PIL import Image

    rows = [json.loads(line) for line in sample_path("train").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for tag in MODALITY_TAGS:
        chosen = [r for r in rows if split_solution(r["solution"])[0] == tag][:PER_MODALITY]
        for k, row in enumerate(chosen):
            name = f"images/{tag.strip('<>').lower()}_{k}.png"
            Image.fromarray(draw(tag, rng)).save(out / name, optimize=False)
            lines.append(json.dumps({**row, "image": name}, ensure_ascii=True))
    path = out / "train_vl.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m medix_fast.demo.sample_images",
                            description="Write the synthetic sample images and train_vl.jsonl.")
    parser.add_argument("--out", type=pathlib.Path, default=DATA_DIR)
    out = parser.parse_args(argv).out
    try:
        print(write_vl_sample(out))
    except OSError as err:
        raise UserError(f"cannot write the sample images to {out}: {err}") from err
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when written, 2 on a user error (one ``error:`` line)."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
