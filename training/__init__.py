"""Training of the two age+gender models evaluated by this project.

- Model A (:func:`training.models.make_model_a`): a CNN trained from scratch.
- Model B (:func:`training.models.make_model_b`): a pretrained backbone (by default
  dlib's face-recognition ResNet, :mod:`training.dlib_face`; or the EfficientNet-Lite family,
  :mod:`training.lite`) fine-tuned in two phases.

Run ``python -m training --help``. This package imports only ``analysis.constants``,
``analysis.dataset``, ``analysis.synthetic`` and ``analysis.figures`` (learning curves) from the rest
of the project.
"""
