"""Carve a held-out split from a COCO training file: by image, seeded, every annotation of an image
kept with it. Use the held-out part for tuning (``val``) and keep the original validation file for
reporting (``test``), so that selection and reporting never share images.

    python -m dmkd.split --ann train.json --holdout 500 --out DIR [--seed 0]

Writes ``DIR/train.json`` (the rest) and ``DIR/holdout.json``; both still point at the original image
folder, so ``train_images`` and ``val_images`` are that folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmkd.data import load_coco
from dmkd.errors import UserError, exit_process, run_command
from dmkd.io import atomic_write_json


def split_coco(data: dict, holdout: int, seed: int) -> tuple[dict, dict]:
    """(rest, held out): ``holdout`` images drawn with ``seed``; the other top-level fields are copied."""
    images = sorted(data["images"], key=lambda image: image["id"])
    if not 0 < holdout < len(images):
        raise UserError(f"--holdout: must be between 1 and {len(images) - 1} (the file has {len(images)} images), "
                        f"but got {holdout}")
    chosen = set(np.random.default_rng(seed).choice(len(images), size=holdout, replace=False).tolist())
    held_ids = {image["id"] for index, image in enumerate(images) if index in chosen}
    parts = []
    for keep in (lambda image_id: image_id not in held_ids, lambda image_id: image_id in held_ids):
        parts.append({**data, "images": [i for i in images if keep(i["id"])],
                      "annotations": [a for a in data.get("annotations", []) if keep(a["image_id"])]})
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmkd.split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="the COCO training annotation file to split")
    parser.add_argument("--holdout", required=True, type=int, help="how many images to hold out")
    parser.add_argument("--out", required=True, help="folder for train.json and holdout.json")
    parser.add_argument("--seed", type=int, default=0, help="which images are held out (default: 0)")
    args = parser.parse_args(argv)

    def run() -> int:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out: {out}: exists and is not a folder")
        load_coco(args.ann)  # the same checks as training: a bad file is one line here, not later
        data = json.loads(Path(args.ann).read_text())
        rest, held = split_coco(data, args.holdout, args.seed)
        atomic_write_json(out / "train.json", rest)
        atomic_write_json(out / "holdout.json", held)
        print(json.dumps({"train_ann": str(out / "train.json"), "holdout_ann": str(out / "holdout.json"),
                          "train_images": len(rest["images"]), "holdout_images": len(held["images"]),
                          "seed": args.seed}, indent=2))
        return 0

    return run_command(run, interrupted="nothing was written")


if __name__ == "__main__":
    exit_process(main())
