"""Annotation formats: ``FORMATS[name]`` is a ``common.DataFormat`` owning its reader (config keys -> records) and
its writer (``common.FormatWriter``), plus the layout and config of a dataset written in it."""

from .coco import CocoFormat
from .common import DataFormat
from .voc import VocFormat
from .yolo import YoloFormat

FORMATS: dict[str, type[DataFormat]] = {f.name: f for f in (VocFormat, CocoFormat, YoloFormat)}

__all__ = ["FORMATS", "DataFormat"]
