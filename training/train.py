"""Fit Model A or Model B on a train/validation split and write the model with its records.

Model A trains in one phase. Model B trains in two: (1) the heads on a frozen backbone,
(2) the top part of the backbone unfrozen at a lower learning rate, its BatchNorm layers kept
frozen and in inference mode. Each phase uses AdamW (or SGD with Nesterov momentum,
optimizer="sgd") with a warm-up + cosine learning-rate schedule and early stopping on the
validation loss; the weights of the best validation epoch over all phases are restored at the
end. Optionally a last "clean" phase (clean_epochs) starts from the best weights so far and
trains without the augmentation layers at a lower rate; then the best epoch of the clean phase
is the result.

Losses: Huber (or MAE) on age in years, binary cross-entropy (optionally label-smoothed) on
gender; the age loss is weighted down so that both heads pull with similar strength. With the
"bins" age head, also the cross-entropy between its softmax over years and a Gaussian soft label.
Optional mixup on the training batches.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.constants import DEFAULT_SEED
from training.catalog import LITE_VARIANTS, PRECISIONS
from training.data import SplitSample, decode_images, make_dataset, targets

MODEL_KEYS = ("A", "B")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Sizes in pixels, rates per step."""

    model_key: str = "A"
    image_size: int = 112
    epochs: int = 30  # maximum over all phases
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = DEFAULT_SEED
    val_split: float = 0.2
    augment: float = 1.0  # augmentation strength, 0 = off
    dropout: float = 0.3
    age_output: str = "linear"  # "linear": standardised years; "log": log-years; "bins": softmax over years
    age_label_sigma: float = 3.0  # "bins": width (years) of the Gaussian soft label around the true age
    age_distribution_loss_weight: float = 1.0  # "bins": weight of the cross-entropy on the soft label
    age_loss: str = "mae"  # "mae" or "huber", on years
    huber_delta: float = 5.0  # years
    # 1/AGE_SCALE_YEARS: the age gradient on the standardised output is then as large as the
    # gender one (an age-dominated trunk learns gender slowly).
    age_loss_weight: float = 0.05
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(α, α) parameter of mixup on training batches, 0 = off
    optimizer: str = "adamw"  # or "sgd" (Nesterov momentum 0.9; tried for A, see BENCHMARKS.md)
    patience: int = 6  # epochs without validation-loss improvement before stopping
    # The last `clean_epochs` epochs train without the augmentation layers, at
    # clean_learning_rate_factor × the last phase's peak rate: a network trained only on
    # rotated/zoomed/shifted images (reflected borders) is off on clean ones (Model A predicted
    # +2.3 years too old on its own clean training images, +0.4 on augmented ones).
    clean_epochs: int = 0
    clean_learning_rate_factor: float = 0.1
    warmup_epochs: float = 1.0
    # Model A
    widths: tuple[int, ...] = (32, 64, 128, 256)
    convs_per_block: int = 1
    pooling: str = "avg"
    # "float32", "bfloat16" (the trunk computes in bfloat16, weights stay float32; the saved
    # model is float32) or "auto" = bfloat16 when the CPU has bfloat16 instructions.
    precision: str = "float32"
    # Model B
    backbone: str = "dlib_face_resnet"
    weights: str = "imagenet"  # "imagenet", "none" (random init) or a file path
    head_epochs: int = 3  # phase 1 (frozen backbone); the rest of `epochs` is phase 2
    fine_tune_fraction: float = 0.5  # top share of the backbone's layers unfrozen in phase 2
    fine_tune_learning_rate: float = 3e-4
    drop_connect: float = 0.0  # stochastic depth in EfficientNet-Lite backbones (rate of the last block)
    hidden_units: int = 128
    # B: leave out of training the images whose gender label a probe on the pretrained backbone's
    # features contradicts with at least this cross-fitted probability (0 = keep every image).
    drop_contradicted: float = 0.0

    @property
    def pretrained(self) -> bool:
        """Model B's backbone starts from pretrained weights (weights is not "none"): its
        BatchNorm statistics are kept, not trained (training.models.make_model_b)."""
        return self.weights != "none"


# Defaults per model, chosen on the validation split within the time budget of a 2-core CPU
# (A <= 15 min, B <= 30 min); what was tried is in BENCHMARKS.md, "Training".
MODEL_DEFAULTS: dict[str, dict] = {
    # 64 px with two convs per block: ~20 s an epoch against ~54 s at 112 px with one, and
    # better per minute (val MAE 6.8 after 13 min vs 11.1 after 9). The "bins" age head with 3
    # clean epochs at the end: val MAE 6.02 against 6.55 (the clean epochs remove a +2.3-year bias
    # on unaugmented faces); flatten instead of global pooling was worse (6.26, 90.1%). 36 epochs
    # instead of 24: 91.5% / 5.68 against 90.7% / 6.02, in 13.3 min (training accuracy stays
    # at validation level: the network is not overfitting, more steps still pay). bfloat16 trunk
    # where the CPU has it: 90.9% / 5.57 in 10.9 min instead of 13.3 (44 epochs: no better).
    "A": dict(image_size=64, convs_per_block=2, epochs=36, batch_size=32, learning_rate=2e-3,
              age_output="bins", clean_epochs=3, precision="auto"),
    # Model B, whatever the backbone: the whole backbone fine-tuned (BatchNorm frozen), the
    # "bins" age head, 3 clean epochs with the clean phase's best epoch as the result. The size,
    # epochs and rates here were tuned with EfficientNet-Lite and serve any backbone without its
    # own in BACKBONE_DEFAULTS.
    "B": dict(backbone="dlib_face_resnet", image_size=160, epochs=20, head_epochs=3, batch_size=32,
              learning_rate=1e-3, fine_tune_learning_rate=3e-4, hidden_units=256, fine_tune_fraction=1.0,
              patience=8, age_output="bins", clean_epochs=3),
}

# Model B's settings that depend on the backbone (applied unless given explicitly).
BACKBONE_DEFAULTS: dict[str, dict] = {
    # dlib's face-recognition ResNet at its native 150 px: val 94.5% / 4.69 in 11 min with 24
    # epochs (8 of heads: its features are already good for gender, 92.3% with the backbone
    # frozen), against 92.9% / 5.10 for Lite2 in 24 min. It needs a fine-tuning rate 10x lower
    # than Lite2: at 3e-4 validation gender fell from 92.1% to 85.5% in the first fine-tuning
    # epoch (its BatchNorms are folded into fixed affine layers: nothing renormalises).
    # Leaving out the ~1% of training images whose gender label a probe on its frozen features
    # contradicts (P >= 0.95; two thirds of them visibly mislabelled) left gender as it was
    # (validation 94.5% and 93.0% with seeds 0 and 1 against 94.5% and 93.1%) and the age MAE
    # slightly better (4.61 and 4.89 against 4.69 and 4.96): kept so B does not learn from
    # labels known to be wrong, not for a measured gain.
    "dlib_face_resnet": dict(image_size=150, epochs=24, head_epochs=8, fine_tune_learning_rate=3e-5,
                             drop_contradicted=0.95),
    # EfficientNet-Lite0 at 160 px, the whole backbone fine-tuned: ahead of 128 px with the top
    # half (val 92.8% / 6.12) and 192 px with the top half (93.1% / 6.01). With the linear age
    # head, 24 epochs: 93.7% / 5.71 in 25 min, best epoch 14. With the "bins" head and 3 clean
    # epochs, 20 epochs: 92.4% / 5.27 in 21 min (age better, Wilcoxon p = 1e-6 on the validation
    # errors; gender not significantly different, McNemar p = 0.10). EfficientNet-Lite2 in its
    # place: 93.0% / 5.25 in 23 min — deeper and wider, yet at 160 px hardly slower on 2 cores
    # (62 s vs 53 s an epoch). Stochastic depth 0.2 (and the clean phase's best epoch as the
    # result): 92.9% / 5.10 — age better on the same images (Wilcoxon p = 0.012), gender the same
    # (McNemar p = 1.0, 19 vs 18 discordant). Fine-tuning at 3e-4: 1e-3 gave the same (92.9% /
    # 5.10), 6e-4 led by 0.7 points with seed 0 (93.6% / 5.05) and trailed by 0.4 with seed 1
    # (92.2% / 5.36 vs 92.6% / 5.26).
    **{f"efficientnet_lite{v}": dict(drop_connect=0.2) for v in LITE_VARIANTS},
    "tiny": dict(weights="none"),  # randomly initialised: it has no pretrained weights
}


def default_config(model_key: str, **overrides) -> TrainConfig:
    """The default configuration of Model A or B, with `overrides` (None values are ignored).

    For B, the chosen backbone's settings (BACKBONE_DEFAULTS) come between the model's defaults
    and the overrides: `backbone="efficientnet_lite2"` alone gives Lite2's tuned settings.

    Unless clean_epochs is given, the default number of clean epochs is capped at a quarter of
    the epochs (so `epochs=2` trains two ordinary epochs). Unless head_epochs is given, B's
    default head epochs are capped at half of the other epochs, so a short run still fine-tunes."""
    if model_key not in MODEL_KEYS:
        raise ValueError(f"unknown model {model_key!r}; choose A (CNN from scratch) or B (pretrained backbone)")
    given = {k: v for k, v in overrides.items() if v is not None}
    weights = given.get("weights")
    if isinstance(weights, str) and weights.lower() in ("imagenet", "none") and not Path(weights).is_file():
        given["weights"] = weights.lower()  # "ImageNet", "None"
    values = dict(MODEL_DEFAULTS[model_key])
    if model_key == "B":
        values.update(BACKBONE_DEFAULTS.get(given.get("backbone", values["backbone"]), {}))
    values.update(given)
    if "clean_epochs" not in given:
        epochs = values.get("epochs", TrainConfig.epochs)
        values["clean_epochs"] = min(values.get("clean_epochs", TrainConfig.clean_epochs), epochs // 4)
    if model_key == "B" and "head_epochs" not in given:
        other = values.get("epochs", TrainConfig.epochs) - values["clean_epochs"]
        values["head_epochs"] = min(values.get("head_epochs", TrainConfig.head_epochs), max(1, other // 2))
    return TrainConfig(model_key=model_key, **values)


@dataclass
class TrainResult:
    model: object  # keras.Model
    history: pd.DataFrame
    metrics: dict
    paths: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    learning_rate: float
    backbone_fraction: float | None = None  # B only: share of backbone layers trainable
    augment: bool = True  # False: the augmentation layers are skipped


def training_phases(config: TrainConfig) -> list[Phase]:
    """The phases of a run, `config.epochs` epochs in all: A "train"; B "heads" then "fine-tune";
    then, with clean_epochs > 0, a "clean" phase without augmentation continuing the last one."""
    if config.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {config.epochs}")
    if not 0 <= config.clean_epochs < config.epochs:
        raise ValueError(f"clean epochs must be at least 0 and fewer than epochs ({config.epochs}), got {config.clean_epochs}")
    epochs = config.epochs - config.clean_epochs
    if config.model_key == "A":
        phases = [Phase("train", epochs, config.learning_rate)]
    else:
        head_epochs = min(config.head_epochs, epochs)
        phases = [Phase("heads", head_epochs, config.learning_rate, 0.0)] if head_epochs > 0 else []
        if epochs > head_epochs:
            phases.append(Phase("fine-tune", epochs - head_epochs, config.fine_tune_learning_rate, config.fine_tune_fraction))
    if config.clean_epochs:
        last = phases[-1]
        phases.append(Phase("clean", config.clean_epochs, last.learning_rate * config.clean_learning_rate_factor,
                            last.backbone_fraction, augment=False))
    return phases


BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 bfloat16 dot-product instructions, as /proc/cpuinfo names them


def cpu_has_bfloat16(cpuinfo="/proc/cpuinfo") -> bool:
    """True when /proc/cpuinfo lists one of BFLOAT16_CPU_FLAGS; False where that file does not exist."""
    try:
        words = set(Path(cpuinfo).read_text(errors="replace").split())
    except OSError:
        return False
    return not words.isdisjoint(BFLOAT16_CPU_FLAGS)


def trunk_precision(config: TrainConfig) -> str:
    """The precision Model A's trunk trains in ("float32" or "bfloat16"); Model B is float32:
    Model B trained about 2× slower in bfloat16 on our CPU (bench/precision_speed.py), Model A's
    trunk of plain convolutions 1.15–1.4× faster."""
    if config.precision == "auto":
        return "bfloat16" if config.model_key == "A" and cpu_has_bfloat16() else "float32"
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {' or '.join(PRECISIONS)}, got {config.precision!r}")
    if config.model_key == "B" and config.precision != "float32":
        raise ValueError("bfloat16 is for Model A only (Model B trains about 2x slower in it)")
    return config.precision


def build_model(config: TrainConfig):
    """(model, backbone or None) for a configuration; raises ValueError for bad backbone/weights."""
    from training.models import make_backbone, make_model_a, make_model_b

    size = (config.image_size, config.image_size)
    if config.model_key == "A":
        model = make_model_a(
            size, widths=config.widths, convs_per_block=config.convs_per_block, augment=config.augment,
            dropout=config.dropout, hidden_units=config.hidden_units, age_output=config.age_output,
            pooling=config.pooling, precision=trunk_precision(config),
        )
        return model, None
    backbone = make_backbone(config.backbone, size, config.weights, drop_connect=config.drop_connect)
    model = make_model_b(
        backbone, augment=config.augment, dropout=config.dropout, hidden_units=config.hidden_units,
        age_output=config.age_output, pretrained=config.pretrained,
    )
    return model, backbone


def compile_model(model, config: TrainConfig, learning_rate: float, steps_per_epoch: int, epochs: int):
    """The optimizer with a linear warm-up then cosine decay over the phase; losses and metrics per
    head. Returns the learning-rate schedule (step -> rate)."""
    import keras

    from training.models import AGE_DISTRIBUTION

    steps = steps_per_epoch * epochs
    warmup = min(int(config.warmup_epochs * steps_per_epoch), steps // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / 10 if warmup else learning_rate,
        decay_steps=max(steps - warmup, 1),
        alpha=0.01,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    if config.age_loss == "huber":
        age_loss = keras.losses.Huber(delta=config.huber_delta)
    elif config.age_loss == "mae":
        age_loss = keras.losses.MeanAbsoluteError()
    else:
        raise ValueError(f"age_loss must be 'huber' or 'mae', got {config.age_loss!r}")
    losses = {"age": age_loss, "gender": keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing)}
    weights = {"age": config.age_loss_weight, "gender": 1.0}
    # Per-head numbers are logged as sample-weighted metrics (age MAE, gender BCE without the
    # loss's label smoothing, the age-distribution cross-entropy): Keras 3.15 logs its own
    # per-output losses ("val_age_loss", ...) as plain means over batches, so a short last
    # validation batch counts as much as a full one (a 100-image validation set logged
    # val_age_loss 20.5 next to val_age_mae 13.6); those entries are dropped from the logs
    # (EpochLog). The total "loss"/"val_loss" are weighted right and stay.
    metrics = {"age": [keras.metrics.MeanAbsoluteError(name="mae")],
               "gender": [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.BinaryCrossentropy(name="bce")]}
    if AGE_DISTRIBUTION in model.output_names:  # training view of a "bins" age head (see training_view)
        losses[AGE_DISTRIBUTION] = keras.losses.CategoricalCrossentropy()
        weights[AGE_DISTRIBUTION] = config.age_distribution_loss_weight
        metrics[AGE_DISTRIBUTION] = [keras.metrics.CategoricalCrossentropy(name="xent")]
    model.compile(optimizer=_optimizer(config, schedule), loss=losses, loss_weights=weights, metrics=metrics)
    return schedule


def _drop_output_losses(logs, output_names) -> None:
    """Remove Keras' per-output loss entries ("age_loss", "val_gender_loss", ...) from `logs` in
    place; the total "loss"/"val_loss" stay (see compile_model)."""
    if logs:
        for key in [k for k in logs if k.endswith("_loss") and k.removeprefix("val_")[: -len("_loss")] in output_names]:
            del logs[key]


def _optimizer(config: TrainConfig, schedule):
    import keras

    if config.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")


def training_targets(model, config: TrainConfig, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Targets for `table`: {"age", "gender"}, plus Gaussian soft age labels for a "bins" age head."""
    from training.models import AGE_DISTRIBUTION, age_distribution_targets, has_age_distribution

    labels = targets(table)
    if has_age_distribution(model):
        labels[AGE_DISTRIBUTION] = age_distribution_targets(labels["age"], config.age_label_sigma)
    return labels


def _callbacks(phase: Phase, config: TrainConfig, best, epoch_log):
    import keras

    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience),
        keras.callbacks.TerminateOnNaN(),
        best,
        epoch_log,
    ]


# The clean phase's best epoch is the result even when its validation loss is a little higher
# than the epoch it started from (the loss hardly sees the bias it removes, see train_model);
# more than this factor higher and the epoch it started from is kept.
CLEAN_LOSS_TOLERANCE = 1.05


def _rate_flag(phases: list[Phase], phase: Phase) -> str:
    """The option that sets the learning rate of `phase` (the clean phase runs at a tenth of the one before)."""
    if phase.name == "clean":
        earlier = [p for p in phases if p.name != "clean"]
        phase = earlier[-1] if earlier else phase
    return "--fine-tune-learning-rate" if phase.name == "fine-tune" else "--learning-rate"


def _make_best_weights(model):
    import keras

    class BestWeights(keras.callbacks.Callback):
        """Keeps the weights of `model` at the epoch with the lowest validation loss, across
        phases (each phase may fit a different view of it, see training_view)."""

        def __init__(self):
            super().__init__()
            self.best_loss = np.inf
            self.best_epoch = -1
            self.best_weights = None

        def on_epoch_end(self, epoch, logs=None):
            loss = (logs or {}).get("val_loss")
            if loss is not None and np.isfinite(loss) and loss < self.best_loss:
                self.best_loss, self.best_epoch = float(loss), epoch
                self.best_weights = model.get_weights()

        def restore(self):
            if self.best_weights is not None:
                model.set_weights(self.best_weights)

    return BestWeights()


def _make_epoch_log():
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Records the learning rate (the mean of the schedule over the epoch's steps: the
        optimizer's own `learning_rate`, read at the end, is already the next step's) and the wall
        time of each epoch, with the phase name, and drops Keras' per-output losses from the logs
        (see compile_model). Set `phase` and `schedule` before each phase. Runs before Keras'
        progress bar, which Keras appends after the given callbacks."""

        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []
            self.phase = ""
            self.schedule = None

        def _step(self) -> int:
            return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.first_step = self._step()

        def on_train_batch_end(self, batch, logs=None):
            _drop_output_losses(logs, self.model.output_names)  # before the progress bar shows them

        def on_epoch_end(self, epoch, logs=None):
            _drop_output_losses(logs, self.model.output_names)
            steps = np.arange(self.first_step, max(self._step(), self.first_step + 1))
            rate = np.mean([float(keras.ops.convert_to_numpy(self.schedule(step))) for step in steps])
            self.rows.append(
                {"epoch": epoch + 1, "phase": self.phase, "learning_rate": float(rate),
                 "seconds": time.perf_counter() - self.started, **{k: float(v) for k, v in (logs or {}).items()}}
            )

    return EpochLog()


def validation_metrics(model, images: np.ndarray, table: pd.DataFrame, batch_size: int = 64) -> dict:
    """Gender accuracy, age MAE and mean signed age error (years) of `model` on `images`."""
    age_pred, p_female = predict_arrays(model, images, batch_size)
    ages = table["age"].to_numpy(float)
    genders = table["gender"].to_numpy(int)
    return {
        "n": int(len(table)),
        "gender_acc": float(np.mean((p_female >= 0.5) == genders)),
        "age_mae": float(np.mean(np.abs(age_pred - ages))),
        "age_bias": float(np.mean(age_pred - ages)),
    }


def predict_arrays(model, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(age in years (n,), P(female) (n,)) for uint8 or float RGB images (n, h, w, 3)."""
    outputs = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    if isinstance(outputs, dict):
        age, gender = outputs["age"], outputs["gender"]
    else:
        age, gender = outputs
    return np.asarray(age, float).reshape(-1), np.asarray(gender, float).reshape(-1)


# The label check needs enough images of each gender for its probe, and stands down when it
# would leave out more than MAX_LEFT_OUT_SHARE of either gender: UTKFace's wrong labels are ~1%,
# so contradicting many more means the features, not the labels, are at fault.
MIN_PROBE_IMAGES_PER_GENDER = 50
MAX_LEFT_OUT_SHARE = 0.05


def gender_label_probe(backbone, images: np.ndarray, genders: np.ndarray, seed: int, chunk: int = 512) -> np.ndarray | None:
    """P(the other gender) for each image, from a logistic regression on the backbone's pooled
    features fitted on the other folds (stratified 5-fold cross-fitting: no image is judged by a
    probe that saw its label). None when a gender has fewer than MIN_PROBE_IMAGES_PER_GENDER images.

    UTKFace has wrong gender labels (bearded men labelled female, ...); a pretrained face
    network's features separate gender well enough that the images whose label they contradict
    with high confidence are mostly such errors (BENCHMARKS.md)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    genders = np.asarray(genders, int)
    if np.bincount(genders, minlength=2).min() < MIN_PROBE_IMAGES_PER_GENDER:
        return None
    features = np.concatenate([  # in chunks: all the images as float32 at once could take gigabytes
        np.asarray(backbone.predict(images[i : i + chunk].astype(np.float32), verbose=0), float).mean(axis=(1, 2))
        for i in range(0, len(images), chunk)
    ])
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    p_female = cross_val_predict(probe, features, genders, cv=folds, method="predict_proba")[:, 1]
    return np.where(genders == 1, 1 - p_female, p_female)


def _contradicted(config: TrainConfig, backbone, x_train: np.ndarray, train: pd.DataFrame, log) -> np.ndarray:
    """Mask of the training images left out because their gender label is contradicted (see
    TrainConfig.drop_contradicted); all False when the check is off or cannot run."""
    none = np.zeros(len(train), bool)
    if backbone is None or not config.drop_contradicted:
        return none
    if str(config.weights).lower() == "none":
        log("Model B: gender labels not checked (the backbone has no pretrained features to check them with)")
        return none
    genders = train["gender"].to_numpy(int)
    p_other = gender_label_probe(backbone, x_train, genders, config.seed)
    if p_other is None:
        log(f"Model B: gender labels not checked (fewer than {MIN_PROBE_IMAGES_PER_GENDER} training images of one gender)")
        return none
    contradicted = p_other >= config.drop_contradicted
    shares = [contradicted[genders == g].mean() for g in (0, 1)]
    if max(shares) > MAX_LEFT_OUT_SHARE:
        log(f"Model B: no training image left out: the pretrained features contradict {shares[0]:.0%} of the male and "
            f"{shares[1]:.0%} of the female labels (P(other gender) >= {config.drop_contradicted:g}), more than "
            f"label errors explain (over {MAX_LEFT_OUT_SHARE:.0%}), so they are not the judge here: training on every image")
        return none
    log(f"Model B: leaving out {int(contradicted.sum())} of {len(train)} training images whose gender label the "
        f"pretrained features contradict (P(other gender) >= {config.drop_contradicted:g}, cross-fitted); "
        f"marked left_out in split_B.csv")
    return contradicted


def train_model(config: TrainConfig, split: SplitSample, out_dir, *, cache: bool = True, verbose: int | None = None, log=print) -> TrainResult:
    """Train one model on `split` and write it with its history, curves, metrics and summary.

    Nothing is written to `out_dir` until training has finished; each file appears atomically.
    """
    import keras

    from training.artifacts import write_artifacts
    from training.models import set_backbone_trainable, training_view

    phases = training_phases(config)
    if config.model_key == "B" and not any(phase.name == "fine-tune" for phase in phases):
        log(f"Model B: warning: all {config.epochs - config.clean_epochs} epochs besides the clean ones train the heads "
            f"(--head-epochs {config.head_epochs}), so the backbone is not fine-tuned; give more --epochs")
    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    size = (config.image_size, config.image_size)
    log(f"Model {config.model_key}: decoding {len(split.train) + len(split.val)} images at {size[0]}x{size[1]} px")
    x_train, bad_train = decode_images(split.train["path"], size, split.train["image_id"], cache=cache)
    x_val, bad_val = decode_images(split.val["path"], size, split.val["image_id"], cache=cache)
    n_undecodable = len(bad_train) + len(bad_val)
    if n_undecodable:  # damaged files that passed the header check: left out, the rest trains
        named = [(table.iloc[i], reason) for table, problems in ((split.train, bad_train), (split.val, bad_val))
                 for i, reason in problems.items()]
        log(f"Model {config.model_key}: {n_undecodable} image(s) cannot be decoded and are left out: "
            + "; ".join(f"{Path(row['path']).name} ({reason})" for row, reason in named[:5])
            + (" ..." if n_undecodable > 5 else ""))
        x_train = np.delete(x_train, list(bad_train), axis=0)
        x_val = np.delete(x_val, list(bad_val), axis=0)
        split = split.without({row["image_id"]: reason for row, reason in named})

    model, backbone = build_model(config)
    left_out = _contradicted(config, backbone, x_train, split.train, log)
    x_train, train_table = (x_train[~left_out], split.train[~left_out]) if left_out.any() else (x_train, split.train)
    steps_per_epoch = int(np.ceil(len(x_train) / config.batch_size))
    train_data = make_dataset(x_train, training_targets(model, config, train_table), config.batch_size,
                              training=True, seed=config.seed, mixup=config.mixup)
    val_data = make_dataset(x_val, training_targets(model, config, split.val), config.batch_size, training=False)
    best, epoch_log = _make_best_weights(model), _make_epoch_log()
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2  # progress bar on a terminal, one line per epoch in a log
    epoch, before_clean = 0, None
    for phase in phases:
        # Keras prints no "Epoch i/n" line for a one-epoch fit, and numbers epochs per fit call:
        # say where each phase sits in the whole run.
        span = f"epoch {epoch + 1}" if phase.epochs == 1 else f"epochs {epoch + 1}–{epoch + phase.epochs}"
        trainable = ""
        if backbone is not None:
            n_trainable = set_backbone_trainable(backbone, phase.backbone_fraction, batchnorm=not config.pretrained)
            trainable = f"{n_trainable} backbone layers trainable, "
        log(f"Model {config.model_key} phase '{phase.name}' ({span} of at most {config.epochs}): {trainable}"
            f"learning rate {phase.learning_rate:g}" + ("" if phase.augment else ", no augmentation"))
        if not phase.augment:
            # The clean phase polishes the best weights so far, and its own best epoch is the
            # result: the validation loss is mostly the soft-label cross-entropy, which hardly sees
            # the augmentation bias these epochs remove (Model B with stochastic depth had its
            # lowest loss before them, 3.768 vs 3.777, though they took its MAE from 5.25 to 5.10) —
            # unless it is clearly worse (CLEAN_LOSS_TOLERANCE) or NaN: then the epoch before it stays.
            best.restore()
            before_clean, best = best, _make_best_weights(model)
        fitted = training_view(model, augment=phase.augment)
        epoch_log.schedule = compile_model(fitted, config, phase.learning_rate, steps_per_epoch, phase.epochs)
        epoch_log.phase = phase.name
        history = fitted.fit(
            train_data, validation_data=val_data, initial_epoch=epoch, epochs=epoch + phase.epochs,
            callbacks=_callbacks(phase, config, best, epoch_log), verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles
        )
        epoch = epoch + len(history.epoch)
        if fitted.stop_training and not np.isfinite(history.history.get("loss", [0])[-1]):
            flag = _rate_flag(phases, phase)
            if best.best_epoch < 0 and (before_clean is None or before_clean.best_epoch < 0):
                raise RuntimeError(f"the loss became NaN in phase '{phase.name}'; try a lower {flag}")
            log(f"Model {config.model_key}: warning: the loss became NaN in phase '{phase.name}' (epoch {epoch}); "
                f"the best epoch before it is kept and the remaining phases are skipped (a lower {flag} avoids this)")
            break
    if before_clean is not None and (best.best_epoch < 0 or best.best_loss > CLEAN_LOSS_TOLERANCE * before_clean.best_loss):
        if best.best_epoch >= 0:
            log(f"Model {config.model_key}: warning: the clean epochs ended worse than they started (validation loss "
                f"{best.best_loss:.4g} against {before_clean.best_loss:.4g}); the epoch before them is kept")
        best = before_clean
    if best.best_epoch < 0:
        raise RuntimeError(f"the validation loss was never finite (NaN from the first epoch); try a lower "
                           f"{'--fine-tune-learning-rate or ' if config.model_key == 'B' else ''}--learning-rate")
    best.restore()
    precision = trunk_precision(config)
    if precision != "float32":  # save (and measure) the float32 twin: it runs the same on any machine
        trained = model
        model, _ = build_model(replace(config, precision="float32"))
        model.set_weights(trained.get_weights())
    seconds = time.perf_counter() - started

    history_table = pd.DataFrame(epoch_log.rows)
    val = validation_metrics(model, x_val, split.val)
    log(f"Model {config.model_key}: best epoch {best.best_epoch + 1}, validation gender accuracy "
        f"{val['gender_acc']:.3f}, age MAE {val['age_mae']:.2f} years ({seconds / 60:.1f} min)")
    metrics = {
        "model": config.model_key,
        "validation": val,
        "validation_note": "the validation images also chose the best epoch and stopped training early: "
                           "report a held-out test set (python -m analysis evaluate), not these numbers",
        "best_epoch": best.best_epoch + 1,
        "best_epoch_phase": next((row["phase"] for row in epoch_log.rows if row["epoch"] == best.best_epoch + 1), None),
        "epochs_run": epoch,
        "phases": [asdict(p) for p in phases],
        "training_seconds": round(seconds, 1),
        "training_precision": precision,
        "split": {"n_train": len(split.train), "n_val": len(split.val), "stratified_by": split.stratified_by, "seed": split.seed,
                  "n_left_out": int(left_out.sum()), "n_undecodable": n_undecodable},
        "config": asdict(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    paths = write_artifacts(out_dir, config.model_key, model, history_table, metrics, split.table(left_out))
    return TrainResult(model=model, history=history_table, metrics=metrics, paths=paths)


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"keras": keras.__version__, "tensorflow": tf.__version__, "python": sys.version.split()[0]}
