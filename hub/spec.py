"""What a plugin declares: ModelSpec, TensorSpec, BatchPolicy, Tolerance, and the Target and
Runtime contracts that build and serve an artifact."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hub.datatypes import DATATYPES, NUMPY_DTYPES, datatype_of, v2_name
from hub.errors import ModelExecutionError, SpecError, name_list
from hub.limits import MODEL_NAME_MAX

#: What a model's name may be (a load or unload request naming anything else is refused at once).
MODEL_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MODEL_NAME_MAX - 1}}}$")

Arrays = Mapping[str, np.ndarray]

#: Bounds of a BatchPolicy (see its checks): Triton's ModelConfig field types, and threads.
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
MICROSECONDS_MAX = 2**63 / 1e6  # seconds: a uint64 count of microseconds, with room for float rounding
MAX_INSTANCES = 1024
#: How a calibrating target (onnx-int8) picks activation ranges from the calibration inputs:
#: the spec's `calibration_method` option, one of these (ONNX Runtime's calibrators).
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
DEFAULT_CALIBRATION_METHOD = "minmax"


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor.

    `shape` is the full shape; -1 marks a variable dimension. When the model batches
    (`BatchPolicy.max_batch_size > 0`) the first dimension is the batch and must be -1.

    `padding`: for a model input with variable non-batch dims (token ids, say), the value the
    batcher pads shorter requests with, so requests of different lengths share one batch
    (each padded to the batch's longest). The model must ignore the padding, e.g. through an
    attention mask that is itself padded with 0. None (the default): only requests of equal
    shape batch together.

    `labels`: for a classifier's output, the name of each class (index i names entry i of a
    row). Clients that ask for the classification extension (tritonclient's
    `InferRequestedOutput(name, class_count=N)`) then get "value:index:label" for the top N.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    padding: float | None = None
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.name or not isinstance(self.name, str):
            raise SpecError(f"tensor name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.datatype, str) or self.datatype not in DATATYPES:
            known = v2_name(self.datatype)
            hint = f" (write {known!r}: datatypes are the V2 names)" if known else ""
            raise SpecError(
                f"tensor '{self.name}': unknown datatype {self.datatype!r}{hint}; "
                f"expected one of {', '.join(sorted(DATATYPES))}"
            )
        if any(d < -1 or d == 0 for d in self.shape):
            raise SpecError(f"tensor '{self.name}': dims must be positive or -1, got {list(self.shape)}")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.padding is not None and self.datatype == "BYTES":
            raise SpecError(f"tensor '{self.name}': padding applies to numeric tensors, not BYTES")

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]

    def matches(self, shape: Sequence[int]) -> bool:
        """True when a concrete shape fits this spec (-1 matches any size)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class BatchPolicy:
    """How the dynamic batcher treats a model.

    - `max_batch_size`: the most rows one forward receives; 0 disables batching (inputs are
      then passed as they come, with no batch dimension implied).
    - `max_queue_delay`: seconds a request may wait for others to join its batch.
    - `preferred_batch_sizes`: sizes worth dispatching at once, without waiting out the delay.
    - `max_queue_size`: queued requests beyond which new ones get RESOURCE_EXHAUSTED (0: no limit).
    - `timeout`: default seconds a request may wait in the queue; the client's deadline wins.
    - `instances`: how many batches of the model may run at once.
    """

    max_batch_size: int = 0
    max_queue_delay: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0
    timeout: float | None = None
    instances: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(self.preferred_batch_sizes))))
        # The upper bounds are what Triton's ModelConfig can carry (max_batch_size is an int32,
        # max_queue_size a uint32, the delay and timeout uint64 microseconds), and one thread per
        # instance. Past them, a config file's `instances = 1000000` started a million threads on
        # the event loop (2.8 GB, never ready), a delay or timeout of nan or inf held every
        # request for good (nan compares false with everything, 0 included), and ModelConfig
        # failed UNKNOWN on the values the server had taken.
        if not 0 <= self.max_batch_size <= INT32_MAX:
            raise SpecError(f"batching.max_batch_size must be 0 to {INT32_MAX}, got {self.max_batch_size}")
        if not 0 <= self.max_queue_delay <= MICROSECONDS_MAX:
            raise SpecError(
                f"batching.max_queue_delay must be 0 to {MICROSECONDS_MAX:.0f} seconds, got {self.max_queue_delay}"
            )
        if not 0 <= self.max_queue_size <= UINT32_MAX:
            raise SpecError(f"batching.max_queue_size must be 0 to {UINT32_MAX}, got {self.max_queue_size}")
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise SpecError(
                f"batching.instances must be 1 to {MAX_INSTANCES} (each is a compute thread), got {self.instances}"
            )
        if self.timeout is not None and not 0 < self.timeout <= MICROSECONDS_MAX:
            raise SpecError(
                f"batching.timeout must be over 0 and at most {MICROSECONDS_MAX:.0f} seconds, got {self.timeout}"
            )
        for size in self.preferred_batch_sizes:
            if not 0 < size <= max(self.max_batch_size, 0):
                raise SpecError(
                    f"batching.preferred_batch_sizes: {size} is outside 1..max_batch_size ({self.max_batch_size})"
                )

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact's outputs may stray from eager.

    Every element must satisfy |a - e| <= atol + rtol * max|e| (rtol is relative to the
    output's scale, so logits near zero do not fail a quantized model on noise). When
    `min_top1` is set, classification-like outputs (2-D, several columns) must also agree
    with eager's argmax on at least that fraction of rows. When `min_cosine` is set, every
    row of a 2-D output (an embedding, say) must have at least that cosine similarity with
    eager's row. When `max_accuracy_drop` is set and the spec's `validation_data` has labels,
    the artifact's accuracy may be at most that much below eager's, as a fraction (0.01 is one
    percentage point); the quantised and half-precision targets default to 0.01.

    The same bounds judge batch invariance: each checked row's outputs inside a mixed batch of
    the largest served size must stay within them of the row's outputs alone (the alone answer
    takes eager's place).
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1: float | None = None
    min_cosine: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise SpecError(
                f"tolerance.max_accuracy_drop is a fraction (0.01 = one point), got {self.max_accuracy_drop}"
            )


@dataclass(frozen=True)
class ModelSpec:
    """Everything the hub needs to build, check and serve one version of a model.

    - `build`: returns the eager model (a `torch.nn.Module` for the built-in targets, in eval
      mode). It receives the inputs positionally, in the order of `inputs`, as torch tensors,
      and returns one tensor or a tuple in the order of `outputs` (or a dict keyed by output
      name). A forward whose parameters are named after the inputs but in another order fails
      the build (the tensors would arrive swapped).
    - `example_inputs`: arrays (or a function returning them) keyed by input name, used to
      export, warm up and check the artifact against eager.
    - `target`: the name of a registered Target: "onnx", "torch", or a plugin's own.
    - `weights`: files the model reads its weights from, so that a change rebuilds it.
      Files inside a plugin package are covered already.
    - `tolerance`: parity bounds for the artifact: one Tolerance for every target, or a
      mapping from target name to Tolerance; a target without one takes its own default.
    - `validation_data`: optional function returning (inputs, labels or None): a larger set
      the artifact is checked on, with accuracy recorded when there are labels. Include the
      extremes clients send (the largest and smallest inputs, the longest and shortest texts):
      the batch-invariance check puts them next to other rows.
    - `calibration_data`: optional arrays (or a function returning them) keyed by served input
      name, that calibrating targets (`onnx-int8`: static activation scales) observe. Default:
      the `validation_data` inputs, else `example_inputs`. Covered by the cache key.
    - `options`: target options, e.g. {"compile_mode": "max-autotune"} for torch-compile,
      {"calibration_method": "percentile"} for onnx-int8 (one of CALIBRATION_METHODS; default
      "minmax"), {"int8_exclude": [...]} (torch module paths kept fp32 by the int8 targets).
      Every option, its target, meaning and default: docs/plugins.md and docs/config.md.
    - `preprocess`: optional per-request step, run outside the batched forward (in a thread,
      not on the event loop): it receives one request's `inputs` as numpy arrays (BYTES as
      object arrays of `bytes`) and returns the arrays the model takes, described by
      `model_inputs`, with the same number of rows. Raise ValueError for input the model
      cannot take: the client gets INVALID_ARGUMENT with its message. Tokenisation goes here.
    - `model_inputs`: what `build()`'s model takes when a `preprocess` turns the served
      `inputs` into something else (token ids and a mask from text, say). Export, warm-up
      and validation work on these; `example_inputs` and `validation_data` stay in terms of
      the served `inputs` and pass through `preprocess`.
    - `postprocess`: optional per-request step, the mirror of `preprocess`: run after the
      batched forward, outside it (in a thread, not on the event loop), it receives one
      request's own rows of the model's outputs (numpy arrays keyed by `model_outputs` names)
      and returns the served `outputs` (numpy arrays; BYTES as object arrays of `bytes` or
      `str`, a label per row say), with the same number of rows when the model batches.
      Raise ValueError for outputs it cannot answer with: the client gets INVALID_ARGUMENT
      with its message; any other exception is an INTERNAL error naming the model and the
      exception's type (the traceback goes to the log). What it returns is checked against
      `outputs`; a mismatch is an INTERNAL error naming the output. The spec cannot run it
      without a built model, so the build does: on the eager model's outputs for the checked
      inputs, failing when the result does not match `outputs`. With `--workers N` it runs
      in the frontend processes, as `preprocess` does.
    - `model_outputs`: what `build()`'s model returns when a `postprocess` turns them into the
      served `outputs` (logits, where clients get a label). Export, parity with eager and the
      batch-invariance check work on these: the artifact is proven on what it computes.
      Metadata, ModelConfig, the classification extension and shared memory see `outputs`.
    """

    name: str
    build: Callable[[], Any]
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    example_inputs: Arrays | Callable[[], Arrays]
    version: int = 1
    target: str = "onnx"
    batching: BatchPolicy = field(default_factory=BatchPolicy)
    tolerance: Tolerance | Mapping[str, Tolerance] | None = None
    weights: Sequence[Path] = ()
    validation_data: Callable[[], tuple[Arrays, np.ndarray | None]] | None = None
    calibration_data: Arrays | Callable[[], Arrays] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    preprocess: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None
    model_inputs: Sequence[TensorSpec] = ()
    postprocess: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None
    model_outputs: Sequence[TensorSpec] = ()
    #: Set by the hub: the plugin that registered the spec and the files it came from.
    plugin: str = ""
    sources: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "model_inputs", tuple(self.model_inputs))
        object.__setattr__(self, "model_outputs", tuple(self.model_outputs))
        object.__setattr__(self, "weights", tuple(Path(p) for p in self.weights))

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def with_(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def examples(self) -> dict[str, np.ndarray]:
        examples = self.example_inputs() if callable(self.example_inputs) else self.example_inputs
        return {name: np.asarray(value) for name, value in examples.items()}

    @property
    def forward_inputs(self) -> tuple[TensorSpec, ...]:
        """The tensors the built model takes: `model_inputs` when there is a preprocess step."""
        return tuple(self.model_inputs) if self.preprocess is not None else tuple(self.inputs)

    @property
    def forward_outputs(self) -> tuple[TensorSpec, ...]:
        """The tensors the built model returns: `model_outputs` when there is a postprocess step."""
        return tuple(self.model_outputs) if self.postprocess is not None else tuple(self.outputs)

    def to_forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Served inputs as the model takes them (through `preprocess` when there is one)."""
        if self.preprocess is None:
            return dict(inputs)
        return {name: np.asarray(value) for name, value in self.preprocess(dict(inputs)).items()}

    def from_forward(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's model outputs as served (through `postprocess` when there is one).
        Text comes back as object arrays, as BYTES tensors are everywhere else in the hub."""
        if self.postprocess is None:
            return dict(outputs)
        result = self.postprocess(dict(outputs))
        if not isinstance(result, Mapping):
            raise ModelExecutionError(
                f"model '{self.name}': postprocess returned {type(result).__name__}, "
                f"not a mapping of output name to array"
            )
        served = {}
        for name, value in result.items():
            array = np.asarray(value)
            served[name] = array.astype(np.object_) if array.dtype.kind in "SU" else array
        return served

    def output_problem(self, outputs: Mapping[str, np.ndarray], rows: int) -> str | None:
        """What is wrong with `postprocess`'s result for a request of `rows` rows, measured
        against the served `outputs` (names, datatypes, shapes, and the rows when the model
        batches), naming the output; None when it is right."""
        expected = [t.name for t in self.outputs]
        missing = [n for n in expected if n not in outputs]
        extra = [str(n) for n in outputs if n not in expected]
        if missing or extra:
            problems = [f"missing output(s) {name_list(missing)}"] if missing else []
            problems += [f"unexpected output(s) {name_list(extra)}"] if extra else []
            return f"{'; '.join(problems)}; the spec's outputs are {name_list(expected)}"
        for tensor in self.outputs:
            array = outputs[tensor.name]
            try:
                datatype = datatype_of(array)
            except TypeError as exc:
                return f"output '{tensor.name}': {exc}"
            if datatype != tensor.datatype:
                return f"output '{tensor.name}' is {datatype}, the spec declares {tensor.datatype}"
            if not tensor.matches(array.shape):
                return f"output '{tensor.name}' has shape {list(array.shape)}, the spec declares {list(tensor.shape)}"
            if self.batching.batching and array.shape[0] != rows:
                return f"output '{tensor.name}' has {array.shape[0]} rows for a request of {rows}"
        return None

    def forward_examples(self) -> dict[str, np.ndarray]:
        return self.to_forward(self.examples())

    @property
    def calibration_method(self) -> str:
        return str(self.options.get("calibration_method", DEFAULT_CALIBRATION_METHOD))

    def calibration(self) -> tuple[str, dict[str, np.ndarray]]:
        """Where the calibration inputs come from ("calibration_data", "validation_data" or
        "example_inputs") and the inputs themselves, as served (before `preprocess`)."""
        if self.calibration_data is not None:
            data = self.calibration_data() if callable(self.calibration_data) else self.calibration_data
            return "calibration_data", {name: np.asarray(value) for name, value in data.items()}
        if self.validation_data is not None:
            return "validation_data", {name: np.asarray(v) for name, v in self.validation_data()[0].items()}
        return "example_inputs", self.examples()

    def tolerance_for(self, target: Target) -> Tolerance:
        """The parity bounds in force for `target`: the spec's, else the target's default."""
        if isinstance(self.tolerance, Tolerance):
            return self.tolerance
        if self.tolerance is not None and target.name in self.tolerance:
            return self.tolerance[target.name]
        return target.tolerance

    def validate(self) -> None:
        """Raise SpecError naming the field when the spec is inconsistent."""
        if not isinstance(self.name, str) or not MODEL_NAME.match(self.name):
            raise SpecError(
                f"model name {self.name!r} must be 1-{MODEL_NAME_MAX} characters of letters, digits, '_', '.', '-'"
            )
        if not isinstance(self.version, int) or self.version < 1:
            raise SpecError(f"model '{self.name}': version must be an integer >= 1, got {self.version!r}")
        if not callable(self.build):
            raise SpecError(f"model '{self.name}': build must be callable")
        if not self.inputs or not self.outputs:
            raise SpecError(f"model '{self.name}': needs at least one input and one output")
        if self.calibration_data is not None and not (
            callable(self.calibration_data) or isinstance(self.calibration_data, Mapping)
        ):
            raise SpecError(f"model '{self.name}': calibration_data must be a mapping of arrays or a function")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise SpecError(
                f"model '{self.name}': option calibration_method {self.calibration_method!r} is not one of "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        if self.preprocess is not None and not callable(self.preprocess):
            raise SpecError(f"model '{self.name}': preprocess must be callable")
        if (self.preprocess is None) != (not self.model_inputs):
            raise SpecError(f"model '{self.name}': model_inputs and preprocess go together (one is missing)")
        if self.postprocess is not None and not callable(self.postprocess):
            raise SpecError(f"model '{self.name}': postprocess must be callable")
        if self.postprocess is not None and not self.model_outputs:
            raise SpecError(
                f"model '{self.name}': postprocess needs model_outputs (what the built model returns, "
                f"which postprocess turns into the served outputs)"
            )
        if self.postprocess is None and self.model_outputs:
            raise SpecError(
                f"model '{self.name}': model_outputs needs a postprocess (that turns them into the served "
                f"outputs); without one the model returns the outputs themselves"
            )
        if not (
            self.tolerance is None
            or isinstance(self.tolerance, Tolerance)
            or (isinstance(self.tolerance, Mapping) and all(isinstance(t, Tolerance) for t in self.tolerance.values()))
        ):
            raise SpecError(f"model '{self.name}': tolerance must be a Tolerance or a mapping of target to Tolerance")
        for kind, tensors in (
            ("input", self.inputs),
            ("model input", self.model_inputs),
            ("output", self.outputs),
            ("model output", self.model_outputs),
        ):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise SpecError(f"model '{self.name}': duplicate {kind} names in {names}")
            for tensor in tensors:
                if not isinstance(tensor, TensorSpec):
                    raise SpecError(f"model '{self.name}': {kind}s must be TensorSpec, got {tensor!r}")
                if self.batching.batching and (not tensor.shape or tensor.shape[0] != -1):
                    raise SpecError(
                        f"model '{self.name}': {kind} '{tensor.name}' must have a leading -1 batch "
                        f"dimension because max_batch_size is {self.batching.max_batch_size}, "
                        f"got shape {list(tensor.shape)}"
                    )
        self._validate_examples()

    def _validate_examples(self) -> None:
        try:
            examples = self.examples()
        except Exception as exc:
            raise SpecError(f"model '{self.name}': example_inputs raised {exc!r}") from exc
        self._check_arrays("example_inputs", examples, self.inputs)
        if self.preprocess is not None:
            try:
                forward = self.to_forward(examples)
            except Exception as exc:
                raise SpecError(f"model '{self.name}': preprocess raised {exc!r} on example_inputs") from exc
            self._check_arrays("preprocess(example_inputs)", forward, self.model_inputs)

    def _check_arrays(self, what: str, examples: Mapping[str, np.ndarray], tensors: Sequence[TensorSpec]) -> None:
        expected = [t.name for t in tensors]
        if sorted(examples) != sorted(expected):
            raise SpecError(f"model '{self.name}': {what} has {sorted(examples)}, expected {sorted(expected)}")
        rows = set()
        for tensor in tensors:
            array = examples[tensor.name]
            try:
                datatype = datatype_of(array)
            except TypeError as exc:
                raise SpecError(f"model '{self.name}': {what} '{tensor.name}': {exc}") from None
            if datatype != tensor.datatype:
                raise SpecError(
                    f"model '{self.name}': {what} '{tensor.name}' is {datatype}, expected {tensor.datatype}"
                )
            if not tensor.matches(array.shape):
                raise SpecError(
                    f"model '{self.name}': {what} '{tensor.name}' has shape "
                    f"{list(array.shape)}, expected {list(tensor.shape)}"
                )
            if self.batching.batching:
                rows.add(array.shape[0])
        if len(rows) > 1:
            raise SpecError(f"model '{self.name}': {what} disagree on the batch size: {sorted(rows)}")


@runtime_checkable
class Runtime(Protocol):
    """A loaded artifact that computes one batch at a time.

    `run` is called from a worker thread, with at most `BatchPolicy.instances` calls at once,
    and must return every output the model computes (`ModelSpec.forward_outputs`: the
    `model_outputs` of a spec with a postprocess) keyed by name, with the batch rows it received.
    """

    device: str

    def run(self, inputs: Arrays) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass
class ArtifactContext:
    """What a Target gets to build or load an artifact.

    `directory` is the artifact's folder (models/<name>/<version>/ or a staging copy of it);
    `module()` builds the eager model once, on first use; `device` is "cpu" or "cuda".
    """

    spec: ModelSpec
    directory: Path
    device: str
    threads: int = 1
    _module: Any = field(default=None, repr=False)

    def module(self) -> Any:
        if self._module is None:
            self._module = self.spec.build()
        return self._module


@dataclass(frozen=True)
class Target:
    """A way to turn an eager model into something served.

    - `build(ctx)`: write the artifact's files into `ctx.directory` (may write none). Leave
      compiling or quantising in memory to `load`: a fresh build calls `load` once, validates
      that runtime, and serves it.
    - `load(ctx)`: return a Runtime over those files. After a fresh build `ctx.directory` is a
      staging folder that is then moved into place, so read the files in `load`, not later.
    - `check_parity`: compare the artifact with eager on the example inputs after building
      (eager is the target named "torch", loaded on the CPU: the built-in, or a plugin's).
    - `calibrated`: the build observes the spec's calibration inputs (`ModelSpec.calibration`),
      so they and the `calibration_method` option are part of the cache key and the manifest.
    - `tolerance`: the default parity bounds for this target.
    - `artifact`: the main file's name, for listings ("" when there is none).
    """

    name: str
    build: Callable[[ArtifactContext], None]
    load: Callable[[ArtifactContext], Runtime]
    description: str = ""
    platform: str = "python"
    check_parity: bool = True
    tolerance: Tolerance = field(default_factory=Tolerance)
    artifact: str = ""
    plugin: str = ""
    calibrated: bool = False
