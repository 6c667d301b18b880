"""Small synthetic prepared datasets (docs/prepared-format.md layout) for tests and benchmarks.

Rows are plain :class:`~mmrole.data.records.Sample` records with short texts; images are Pillow-drawn PNGs of
varying sizes (so image tensors are ragged), optionally with some files corrupt. Deterministic for a seed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

WORDS = (
    "the sky is blue and the sea is calm a red castle stands on the hill with a golden door "
    "my friend looks at the old tree under the night light"
).split()


def _image(rng: random.Random, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h = rng.randint(56, 150), rng.randint(56, 150)
    im = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
        d.rectangle(
            [x0, y0, x0 + rng.randint(5, w // 2), y0 + rng.randint(5, h // 2)],
            fill=tuple(rng.randint(0, 255) for _ in range(3)),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def sample_rows(n: int, seed: int = 0, n_images: Optional[int] = None, judge: bool = False) -> list[dict]:
    """``n`` Sample rows; images named ``img_XXXX.png`` (``n_images`` distinct ones, default one per row)."""
    from mmrole.data.records import Sample

    rng = random.Random(seed)
    n_images = n_images or n
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
        q = "What do you see in this picture?"
        if judge:
            q = f"Compare two replies about the image. Model A: {answer} Model B: {answer[::-1]}"
            answer = f"Model A is better here. [Scores]: ({rng.randint(5, 9)}, {rng.randint(3, 8)})"
        rows.append(
            Sample(
                id=f"syn_{i:05d}",
                system="You are Ada, a painter.",
                user_text=q,
                image=f"img_{i % n_images:04d}.png",
                target=answer,
                role="Ada",
                other_role="a curious human",
                script="Synthetic",
                k=1,
                dialogue_type="judge" if judge else "comment",
            ).to_row()
        )
    return rows


def write_prepared(
    out: str | Path,
    n_rows: int,
    seed: int = 0,
    split: str = "train",
    corrupt: Iterable[int] = (),
    n_images: Optional[int] = None,
    shard_rows: int = 10_000,
    judge: bool = False,
) -> Path:
    """Write ``out/manifest.json``, ``out/<split>/part-*.parquet`` and ``out/images/*.png``. Row indices in
    ``corrupt`` get an image file that is not an image (the pipeline must reject them by id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmrole.data.prepared import FORMAT, sample_schema

    out = Path(out)
    rng = random.Random(seed)
    rows = sample_rows(n_rows, seed, n_images, judge)
    images = out / "images"
    corrupt = set(corrupt)
    done: set[str] = set()
    for i, r in enumerate(rows):
        if i in corrupt:  # its own file, so other rows sharing an image stay valid
            r["image"] = f"corrupt_{i:05d}.png"
            (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            (images / r["image"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
            continue
        if r["image"] not in done:
            _image(rng, images / r["image"])
            done.add(r["image"])
    schema = sample_schema(False)
    (out / split).mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(0, n_rows, shard_rows):
        chunk = rows[k : k + shard_rows]
        rel = f"{split}/part-{k // shard_rows:05d}.parquet"
        table = pa.Table.from_pylist([{f.name: r.get(f.name, "") for f in schema} for r in chunk], schema=schema)
        pq.write_table(table, out / rel)
        files.append(rel)
    manifest = {
        "format": FORMAT,
        "dataset_root": str(out),
        "images_root": str(images.resolve()),
        "embed_images": False,
        "splits": {split: {"files": files, "rows": n_rows}},
        "counts": {split: {"in": n_rows, "out": n_rows, "rejected": 0, "rejected_by_reason": {}}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
