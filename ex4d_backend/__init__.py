"""EX-4D backend: footage -> depth -> DW-mesh -> guide videos -> video diffusion.

Owns torch; knows nothing of Blender. Conventions (see ``cameras.py``): the world frame is the
OpenCV camera frame of source frame 0 (x right, y down, z forward, units = depth units); cameras are
OpenCV world-to-camera 4x4 matrices plus 3x3 intrinsics in pixels.
"""

__version__ = "0.1.0"
