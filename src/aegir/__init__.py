"""Ægir Eider's Lightning Lance: a data flywheel for PV panel segmentation in VHR Earth-observation imagery."""

__version__ = "0.1.0"
