"""Models: DINOv3 backbones and their weight formats, input specification, necks, heads, the detector builder."""
