"""Training on ``training_data``: tensor decoding, DataModule, LightningModule, YOLO baseline, and the one tiled
predictor (:mod:`.predictor`) every inference path uses. Files are read and written through :mod:`aegir.store`.

Imports :mod:`aegir.compat.torchvision_nms` first so torchvision-based libraries import on CPU torch, also in
spawned DataLoader workers (which import this package to unpickle the dataset).
"""

from aegir.compat import torchvision_nms as _torchvision_nms  # noqa: F401
