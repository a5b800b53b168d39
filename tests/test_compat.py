import subprocess
import sys

import torch

from aegir.compat.torchvision_nms import nms_reference


def test_torchvision_imports_after_the_shim_in_a_fresh_interpreter():
    code = (
        "import aegir.compat.torchvision_nms as c, torch, torchvision\n"
        "c.enable_torchvision_ops_nms()\n"
        "from torchvision.ops import nms\n"
        "b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.]])\n"
        "print(nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 2]"


def test_reference_nms_keeps_best_and_disjoint_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [5, 5, 15, 15], [50, 50, 60, 60.]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    # box 1 (best) suppresses box 0 (IoU 0.9); box 2 overlaps box 1 by 20/180 < 0.5 and stays.
    assert nms_reference(boxes, scores, 0.5).tolist() == [1, 2, 3]
    assert nms_reference(boxes[:0], scores[:0], 0.5).numel() == 0
