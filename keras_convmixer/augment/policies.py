"""RandAugment's op sets and the checks of its arguments, per policy (torchvision's and timm's).

Kept apart from the layer so that the layer holds only the sampling and the two execution paths; the
tables are Keras-free.
"""

import numpy as np

TORCHVISION_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
# timm's _RAND_INCREASING_TRANSFORMS and _RAND_TRANSFORMS, in timm's order.
TIMM_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
TIMM_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
POLICIES = ("torchvision", "timm")
TIMM_FILL = (128.0, 128.0, 128.0)
LEVEL_DENOM = 10.0  # timm's magnitude scale: m10 is each op's full range (its default clip)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"RandAugment {name} must be an integer >= {low}, got {value!r}.")
    return int(value)


def _check_magnitudes(policy, magnitude, num_magnitude_bins, magnitude_std, magnitude_max):
    bins = _check_int("num_magnitude_bins", num_magnitude_bins, 1)
    if policy == "torchvision":
        magnitude = _check_int("magnitude", magnitude, 0)
        if magnitude >= bins:
            raise ValueError(
                f"RandAugment magnitude must be < num_magnitude_bins={bins} "
                f"for policy 'torchvision', got {magnitude!r}."
            )
        if magnitude_std:
            raise ValueError(
                f"RandAugment magnitude_std is a timm option; policy 'torchvision' has none, got {magnitude_std!r}."
            )
    elif not 0.0 <= float(magnitude):
        raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude!r}.")
    std = float(magnitude_std)
    if not std >= 0.0:
        raise ValueError(f"RandAugment magnitude_std must be >= 0, got {magnitude_std!r}.")
    top = float(magnitude_max) if magnitude_max is not None else None
    if top is not None and not top > 0.0:
        raise ValueError(f"RandAugment magnitude_max must be > 0, got {magnitude_max!r}.")
    magnitude = magnitude if policy == "torchvision" else float(magnitude)
    return dict(magnitude=magnitude, num_magnitude_bins=bins, magnitude_std=std, magnitude_max=top)


def _check_fill(policy, fill):
    if fill is None:
        fill = (0.0, 0.0, 0.0) if policy == "torchvision" else TIMM_FILL
    if isinstance(fill, (int, float)):
        fill = (float(fill),) * 3
    checked = tuple(float(f) for f in fill)
    if any(not 0.0 <= f <= 255.0 for f in checked):
        raise ValueError(f"RandAugment fill must be values in [0, 255], got {fill!r}.")
    return checked


def _check_ops(policy, increasing, ops):
    if policy == "torchvision":
        available = TORCHVISION_OPS
    else:
        available = TIMM_INCREASING_OPS if increasing else TIMM_OPS
    if ops is None:
        ops = available
    if isinstance(ops, str) or not ops or any(name not in available for name in ops):
        raise ValueError(
            f"RandAugment ops must be a non-empty subset of {available} for policy {policy!r}, got {ops!r}."
        )
    return tuple(ops)


def check_arguments(
    policy,
    *,
    num_ops,
    magnitude,
    num_magnitude_bins,
    magnitude_std,
    magnitude_max,
    prob,
    increasing,
    translate_pct,
    fill,
    interpolation,
    ops,
):
    """The layer's attributes for these arguments, with each policy's defaults filled in; one line otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"RandAugment policy must be one of {POLICIES}, got {policy!r}.")
    if prob is None:
        prob = 0.5 if policy == "timm" else 1.0
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"RandAugment prob must be in [0, 1], got {prob!r}.")
    if interpolation is None:
        interpolation = "nearest" if policy == "torchvision" else "bilinear"
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"RandAugment interpolation must be 'nearest' or 'bilinear', got {interpolation!r}.")
    return dict(
        policy=policy,
        num_ops=_check_int("num_ops", num_ops, 0),
        **_check_magnitudes(policy, magnitude, num_magnitude_bins, magnitude_std, magnitude_max),
        prob=float(prob),
        increasing=bool(increasing),
        translate_pct=float(translate_pct),
        fill=_check_fill(policy, fill),
        interpolation=interpolation,
        op_names=_check_ops(policy, bool(increasing), ops),
    )
