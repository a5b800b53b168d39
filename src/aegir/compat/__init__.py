"""Compatibility shims, each explained in its own module docstring.

``torchvision_nms``: the registry's torchvision 0.28.0 wheel is CUDA-linked; on the CPU build of torch 2.13.0 its
C++ ops library does not load, and ``import torchvision`` then dies registering a fake kernel for the missing
``torchvision::nms`` operator. Importing :mod:`aegir.compat.torchvision_nms` first defines that operator (and
``qnms``) with :mod:`torch.library` and a pure-torch CPU kernel, so torchvision, timm, smp and samgeo import.
Every aegir module that imports torch-based libraries imports this first, so spawned workers get it too.
"""
