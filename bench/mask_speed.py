"""Mask Factory speed: prompts/s of the offline backend on 256 px tiles (goal >= 20/s on 2 cores), and how the
cost per image grows with the number of prompts per image.

Real data: the Jiang PV01 tiles (256x256) with one box per ground-truth component. "all" times the backend over
every tile with all its prompts (one GrabCut pass per tile). The scaling table takes the tiles with >= 16
components and times 1, 2, 4, 8, 16 prompts per image (the first k boxes) on the same tiles.

    python bench/mask_speed.py [--shared ../shared/data] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from aegir.dataflows.mask_factory import image_rgb
from aegir.masks import get_backend
from aegir.masks.prompts import pixel_prompts
from aegir.store.image_files import list_image_files, read_mask
from aegir.store.mask_files import read_image_chip
from aegir.utils.components import mask_component_boxes

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    jiang = args.shared / "vhr" / "jiang_pv01"
    backend = get_backend("offline")
    tiles = []
    for path in list_image_files(jiang / "images"):
        boxes = mask_component_boxes(read_mask(jiang / "masks" / path.name))
        if boxes:
            tiles.append((image_rgb(read_image_chip(path)), boxes))
    assert all(t[0].shape[:2] == (256, 256) for t in tiles)

    def run(k: int | None, subset) -> tuple[float, int]:
        best, count = np.inf, 0
        for _ in range(args.repeat):
            start, count = time.perf_counter(), 0
            for rgb, boxes in subset:
                chosen = boxes if k is None else boxes[:k]
                backend.segment(rgb, pixel_prompts(256, 256, chosen))
                count += len(chosen)
            best = min(best, time.perf_counter() - start)
        return best, count

    seconds, prompts = run(None, tiles)
    report = {"tiles": len(tiles), "prompts": prompts, "seconds": round(seconds, 3),
              "prompts_per_s": round(prompts / seconds, 1), "ms_per_tile": round(1000 * seconds / len(tiles), 1),
              "goal_prompts_per_s": 20, "scaling": []}
    many = [t for t in tiles if len(t[1]) >= 16]
    for k in (1, 2, 4, 8, 16):
        sec, count = run(k, many)
        report["scaling"].append({"prompts_per_image": k, "ms_per_image": round(1000 * sec / len(many), 1),
                                  "prompts_per_s": round(count / sec, 1)})
    report["scaling_tiles"] = len(many)
    print(json.dumps(report, indent=1))
    print(f"offline: {report['prompts_per_s']} prompts/s on 256 px tiles (goal >= 20: "
          f"{'met' if report['prompts_per_s'] >= 20 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
