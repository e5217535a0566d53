"""The converter's exception tree.

Every error raised by ``edgepack build`` derives from :class:`ConverterError`. Each one names
the *step* that failed (``spec``, ``load-model``, ``calibration-data``, ``convert``, ``quantize``,
``evaluate``, ``gate``, ``bundle``), the *variant* it concerns when there is one, and a *fix*:
a sentence telling the user what to change. A build catches per-variant errors, records them
in the report and goes on with the other variants; only errors that concern every variant
(a bad spec, an unloadable model, an empty evaluation set) stop the build::

    ConverterError
    ├── SpecError              edgepack.toml (or a command-line override) is invalid
    ├── ModelInputError        the input model cannot be found, loaded or exported to ONNX
    ├── DataError              calibration or evaluation data is unusable
    │   ├── FitDataError           the [fit] (training) data cannot be read
    │   ├── CalibrationDataError   wrong shape / dtype / empty calibration set
    │   └── EvaluationDataError    empty evaluation set, labels that do not match
    ├── ConversionError        one variant failed to convert (ONNX fp16, TFLite, ...)
    ├── QuantizationError      one variant failed to quantize (an op that cannot be quantized)
    ├── AccuracyBudgetError    a variant lost more of the metric than the budget allows
    └── BundleOutputError      the bundle could not be assembled or signed
"""

from __future__ import annotations


class ConverterError(Exception):
    """Base of every error raised by the converter.

    Args:
        message: what went wrong, with the expected and the found value where they apply.
        step: the build step that failed.
        variant: the variant id when the error concerns one variant only.
        fix: what the user should do about it.
    """

    default_step = "build"

    def __init__(
        self, message: str, *, step: str | None = None, variant: str | None = None, fix: str | None = None
    ) -> None:
        self.message = message
        self.step = step or self.default_step
        self.variant = variant
        self.fix = fix
        where = f"step {self.step}" + (f", variant {variant}" if variant else "")
        text = f"[{where}] {message}"
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)

    def to_dict(self) -> dict[str, str | None]:
        """The error as it appears in build-report.json."""
        return {
            "type": type(self).__name__,
            "step": self.step,
            "variant": self.variant,
            "message": self.message,
            "fix": self.fix,
        }


class SpecError(ConverterError):
    """edgepack.toml or a command-line override is invalid."""

    default_step = "spec"


class ModelInputError(ConverterError):
    """The input model cannot be found, loaded or exported to ONNX."""

    default_step = "load-model"


class DataError(ConverterError):
    """Calibration or evaluation data is unusable."""

    default_step = "data"


class FitDataError(DataError):
    """The ``[fit]`` data set (training data the preprocessing learns from) cannot be read."""

    default_step = "fit-data"


class CalibrationDataError(DataError):
    """Calibration data is empty or has the wrong shape or dtype for the model."""

    default_step = "calibration-data"


class EvaluationDataError(DataError):
    """The evaluation set is empty, or its labels do not fit the metric."""

    default_step = "evaluation-data"


class ConversionError(ConverterError):
    """One variant failed to convert."""

    default_step = "convert"


class QuantizationError(ConverterError):
    """One variant failed to quantize, typically an op the runtime cannot run in int8."""

    default_step = "quantize"


class AccuracyBudgetError(ConverterError):
    """A variant lost more of the declared metric than the accuracy budget allows."""

    default_step = "gate"


class BundleOutputError(ConverterError):
    """The bundle could not be assembled or signed."""

    default_step = "bundle"
