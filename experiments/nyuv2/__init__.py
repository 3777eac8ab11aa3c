"""NYUv2: 13-class segmentation, depth and surface normals with SegNet-MTAN."""
