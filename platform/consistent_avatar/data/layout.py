"""On-disk actor layouts that ingest reads and the synthetic generator writes.

Two layouts are supported. Both carry, per frame i of one actor's monocular video: the real frame
(RGB + foreground mask), the tracked FLAME expression E_i (100 floats) and pose P_i (6 floats), and
the stage-1 renders (coarse RGB + normal map) of a volumetric avatar such as INSTA.

INSTA layout (``kind = "insta"``)
---------------------------------
Follows INSTA's published data layout (``scripts/transforms.py`` and ``postprocess.py`` of the
INSTA repository)::

    <actor>/
      transforms.json         NeRF-style camera file: w, h, fl_x, fl_y, cx, cy, camera_angle_x,
                              camera_angle_y and "frames": [{file_path, transform_matrix (4x4
                              camera-to-world), exp_path, mesh_path?, depth_path?,
                              seg_mask_path?}, ...] in frame order
      images/00000.png        real frame, RGBA: the alpha channel is the foreground mask
      flame/exp/00000.txt     100 FLAME expression coefficients, one per line (np.savetxt)
      meshes/, depth/, seg_mask/   INSTA's other outputs: not needed here, ignored if present

ConsistentAvatar extends it (INSTA has no per-frame pose file and does not store its own renders
next to the data):

      flame/pose/00000.txt    6 pose values, one per line: global rotation as an axis-angle vector
                              (3) then translation (3). Per-frame key ``pose_path`` overrides.
      stage1/rgb/00000.png    the stage-1 coarse RGB render of that frame (RGB or RGBA)
      stage1/normal/00000.png the stage-1 normal map, RGB encoding (n + 1) / 2 * 255
                              Per-frame keys ``stage1_rgb_path`` / ``stage1_normal_path`` override.
      synthetic.json          only for synthetic actors: generator ground truth (see synthetic/)

A frame's id is the stem of its ``file_path`` (``images/00042.png`` -> ``00042``); the other
per-frame files are found by that id unless a frame entry names them explicitly. Frames are
ordered as listed in ``transforms.json``. If ``images/*.png`` has no alpha channel, a mask is read
from ``masks/<id>.png`` (8-bit, 255 = foreground); if neither exists the error says so.

Video layout (``kind = "video"``)
---------------------------------
An actor given as videos (decoded with decord) plus a tracking file::

    <actor>/
      video.mp4               the real frames (any container/codec decord's FFmpeg reads)
      mask.mp4                optional foreground mask video (grey; > 127 = foreground);
                              without it the mask is all foreground
      tracking.npz            arrays "expression" (K, 100) and "pose" (K, 6), float
                              (tracking.json with the same keys as lists is also accepted)
      stage1/rgb.mp4          stage-1 coarse RGB renders, or a folder stage1/rgb/*.png
      stage1/normal.mp4       stage-1 normal maps, or a folder stage1/normal/*.png

Frame counts of every part must agree; ingest reports any mismatch by actor and part.
"""

from __future__ import annotations

EXPRESSION_DIM = 100
POSE_DIM = 6

# INSTA layout
TRANSFORMS_FILE = "transforms.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
EXPRESSION_DIR = "flame/exp"
POSE_DIR = "flame/pose"
STAGE1_RGB_DIR = "stage1/rgb"
STAGE1_NORMAL_DIR = "stage1/normal"
SYNTHETIC_TRUTH_FILE = "synthetic.json"

# Video layout
VIDEO_FILE = "video.mp4"
MASK_VIDEO_FILE = "mask.mp4"
TRACKING_NPZ = "tracking.npz"
TRACKING_JSON = "tracking.json"
STAGE1_RGB_VIDEO = "stage1/rgb.mp4"
STAGE1_NORMAL_VIDEO = "stage1/normal.mp4"

# The eight MEAD emotions, in a fixed order (index = label id everywhere in the platform).
EMOTIONS: tuple[str, ...] = (
    "angry",
    "contempt",
    "disgusted",
    "fear",
    "happy",
    "neutral",
    "sad",
    "surprised",
)
