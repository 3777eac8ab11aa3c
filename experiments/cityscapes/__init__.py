"""Cityscapes: 7-class segmentation and depth with SegNet-MTAN."""
