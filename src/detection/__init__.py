"""Object detection on frozen DINOv3 backbones (SSD / RetinaNet / FCOS heads)."""

__version__ = "0.1.0"
