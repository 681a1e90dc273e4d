"""Writes keras215.keras and keras215_expected.npz (test fixtures): a tiny age+gender model saved the
way coursework on Colab was in 2023-24, exercising what Keras 3 rejects in Keras 2.15 .keras files.

Run with TensorFlow 2.15, e.g. `python -m venv /tmp/tf215 && /tmp/tf215/bin/pip install
tensorflow-cpu==2.15.1 && /tmp/tf215/bin/python tests/data/keras215/build.py`. Random weights, no data.
"""
from pathlib import Path

import numpy as np, tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers
tf.keras.utils.set_random_seed(3)
inputs = keras.Input((16, 16, 3), name="image")
x = tf.keras.applications.mobilenet_v2.preprocess_input(inputs)   # TFOpLambda layers
trunk = keras.Sequential([
    layers.Conv2D(6, 3, padding="same", input_shape=(16, 16, 3)),
    layers.BatchNormalization(),                                     # axis stored as [3]
    layers.ReLU(),
    layers.DepthwiseConv2D(3, padding="same"),                       # groups=1 stored
    layers.GlobalAveragePooling2D(),
], name="trunk")                                                     # nested: nodes numbered from 1
f = trunk(x)
model = keras.Model(inputs, {"age_output": layers.Dense(1, name="age_output")(f),
                             "gender_output": layers.Dense(2, activation="softmax", name="gender_output")(f)})
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (8, 16, 16, 3)).astype("uint8")
# BatchNorm statistics from a real batch, so outputs depend on the input
bn = trunk.layers[1]
feats = trunk.layers[0](tf.keras.applications.mobilenet_v2.preprocess_input(images.astype("float32"))).numpy()
bn.set_weights([np.ones(6), np.zeros(6), feats.mean((0, 1, 2)), feats.var((0, 1, 2)) + 1e-3])
HERE = Path(__file__).parent
model.save(HERE / "keras215.keras")
out = model.predict(images.astype("float32"), verbose=0)
np.savez(HERE / "keras215_expected.npz", images=images, age=out["age_output"][:, 0], p_female=out["gender_output"][:, 1])
print(out["age_output"][:, 0], out["gender_output"][:, 1])

# keras.applications' "caffe" preprocessing written on the input, saved as .h5 (TF 2.15 cannot save
# this one as .keras): a SlicingOpLambda (x[..., ::-1]) and a TFOpLambda (nn.bias_add of -mean).
inputs = keras.Input((16, 16, 3), name="image")
x = tf.keras.applications.resnet50.preprocess_input(inputs)
x = layers.Conv2D(4, 1, activation="tanh", kernel_initializer=keras.initializers.RandomNormal(stddev=0.02))(x)
f = layers.GlobalAveragePooling2D()(x)
caffe = keras.Model(inputs, [layers.Dense(1, name="age")(f), layers.Dense(1, activation="sigmoid", name="gender")(f)])
caffe.save(HERE / "keras215_caffe.h5")
age, gender = caffe.predict(images.astype("float32"), verbose=0)
np.savez(HERE / "keras215_caffe_expected.npz", images=images, age=age[:, 0], p_female=gender[:, 0])
print(age[:, 0], gender[:, 0])

# Layers whose Keras 2 arguments Keras 3 reads differently: LeakyReLU(alpha), SpatialDropout2D
# (no noise_shape/trainable), a mixed_float16 dtype policy, SeparableConv2D's extra keys.
inputs = keras.Input((16, 16, 3), name="image")
x = layers.Rescaling(1 / 255.0)(inputs)
x = layers.RandomFlip("horizontal")(x)
x = layers.Conv2D(6, 3, dtype="mixed_float16")(x)
x = layers.LeakyReLU(alpha=0.05)(x)
x = layers.SeparableConv2D(6, 3)(x)
x = layers.SpatialDropout2D(0.1)(x)
f = layers.GlobalMaxPooling2D()(x)
mixed = keras.Model(inputs, {"age": layers.Dense(1, name="age")(f), "gender": layers.Dense(1, activation="sigmoid", name="gender")(f)})
mixed.save(HERE / "keras215_layers.h5")
out = mixed.predict(images.astype("float32"), verbose=0)
np.savez(HERE / "keras215_layers_expected.npz", images=images, age=out["age"][:, 0], p_female=out["gender"][:, 0])
print(out["age"][:, 0])

# TensorFlow ops written on tensors that standard Keras layers compute, a constant written first,
# a layer name with "/" (as Keras 2's MobileNetV3 and DenseNet have) and ConvNeXt's LayerScale.
from keras.src.applications.convnext import LayerScale

inputs = keras.Input((16, 16, 3), name="image")
x = 2.0 * (inputs / 255.0) - 1.0                       # constant first: _CONSTANT_VALUE
x = 1.0 - x                                             # constant first, not commutative
a = tf.nn.relu(layers.Conv2D(4, 3, padding="same", name="block1/conv")(x))
b = layers.Conv2D(4, 1, name="block1/shortcut")(x)
x = a + b                                               # two tensors
x = tf.concat([x, LayerScale(0.5, 4, name="block1/scale")(a)], axis=-1)
x = tf.image.resize(x, (8, 8))
f = tf.reduce_mean(x, axis=[1, 2])
tfops = keras.Model(inputs, [layers.Dense(1, name="age")(f), layers.Dense(1, activation="sigmoid", name="gender")(f)])
tfops.save(HERE / "keras215_tfops.h5")
age, gender = tfops.predict(images.astype("float32"), verbose=0)
np.savez(HERE / "keras215_tfops_expected.npz", images=images, age=age[:, 0], p_female=gender[:, 0])
print(age[:, 0])
