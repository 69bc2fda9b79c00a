"""The vocabulary every folder speaks: options, modules, budgets, profiles, plans, evaluations, errors.

Pydantic (frozen) for what crosses a process or the wire; numpy for the `[modules x options]`
matrices. No torch here: the planner must run on a machine without it.

Sizes are always in **bits** (ints), never bytes, until something is printed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

PROFILE_FORMAT = "bitplan.profile/2"
# still read: its `estimator` carried the quantizer as a suffix ("fisher/gptq"), `Profile.from_dict` splits it
PROFILE_FORMAT_1 = "bitplan.profile/1"
# a plan names its profile by id only, so the quantizer moving into the profile leaves plans as they are
PLAN_FORMAT = "bitplan.plan/1"

# Scales are stored in fp16; an asymmetric option also stores one integer zero of `bits` bits per
# group (packed like the weights).  Changing these changes every size the planner reasons about.
SCALE_BITS = 16
ALLOWED_BITS = (2, 3, 4, 5, 6, 8, 16)
# The input embedding as a planned module (`bitplan profile --embeddings plan`); with a tied head it
# stands for the pair.  It takes no option under EMBED_MIN_BITS (planner/engines.py `constrain` says why).
EMBED_ROLE = "embed_tokens"
EMBED_MIN_BITS = 4
# The activations GPTQ's statistics `H` come from when a plan is applied (`apply --gptq-inputs`): the
# unquantized model's, or those the plan's own model, quantized up to each block, feeds that block.  The
# default is `quantized`: on the embedded model it was better or level in every paired comparison of
# bench/recipes.py (docs/measurements.md), most at low bits and on text of another domain.
GPTQ_INPUTS = ("original", "quantized")
DEFAULT_GPTQ_INPUTS = "quantized"


# --------------------------------------------------------------------------------------- errors


class BitplanError(ValueError):
    """Base of every error the library raises on bad input; the service maps `status_code`."""

    status_code = 422


class InvalidInput(BitplanError):
    pass


class NotFound(BitplanError):
    status_code = 404


class PathNotAllowed(BitplanError):
    status_code = 403


class UnknownModule(BitplanError):
    pass


class NotACausalLM(BitplanError):
    pass


class InfeasibleBudget(BitplanError):
    """The budget is below the smallest plan that satisfies the constraints."""

    def __init__(self, message: str, smallest_bits: int):
        super().__init__(message)
        self.smallest_bits = smallest_bits


# -------------------------------------------------------------------------------------- options


class Option(BaseModel):
    """One way to store a module: `bits` per weight, groupwise scale (and zero) every `group_size` inputs."""

    model_config = ConfigDict(frozen=True)

    bits: int
    group_size: int | None = 64  # None: one group per output row (per-channel)
    symmetric: bool = False
    # A GGUF type (`q4_k`): stored, sized and quantized as llama.cpp does it (`db.formats.GGUF_TYPES`);
    # `bits` is then its code bits and `group_size` its block.  Made by `gguf_option`.
    gguf: str | None = None

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and (v < 8 or v & (v - 1)):
            raise ValueError(f"group_size must be a power of two >= 8 (or null for per-channel), got {v}")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # an option of bitplan's own dumps (and hashes into ids) as it did before GGUF options existed
        d = handler(self)
        if d.get("gguf") is None:
            d.pop("gguf", None)
        return d

    @field_validator("gguf")
    @classmethod
    def _gguf(cls, v: str | None) -> str | None:
        from bitplan.db.formats import GGUF_TYPES

        if v is not None and v not in GGUF_TYPES:
            raise ValueError(f"gguf must be one of {sorted(GGUF_TYPES)}, got {v!r}")
        return v

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def n_groups(self, in_features: int) -> int:
        """Groups per output row; a group size that does not divide `in_features` pads the last group."""
        if not self.quantized:
            return 0
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def size_bits(self, out_features: int, in_features: int) -> int:
        """Exact storage: codes + one fp16 scale (+ one `bits`-bit zero if asymmetric) per group; a GGUF
        type's blocks, of the type llama-quantize really stores for rows of `in_features`."""
        if self.gguf is not None:
            from bitplan.db.formats import GGUF_TYPES, stored_gguf_type

            return GGUF_TYPES[stored_gguf_type(self.gguf, in_features)].size_bits(out_features, in_features)
        if not self.quantized:
            return out_features * in_features * 16
        per_group = SCALE_BITS + (0 if self.symmetric else self.bits)
        return out_features * in_features * self.bits + out_features * self.n_groups(in_features) * per_group

    @property
    def label(self) -> str:
        if self.gguf is not None:
            return self.gguf.upper()
        if not self.quantized:
            return "16b"
        g = "ch" if self.group_size is None else str(self.group_size)
        return f"{self.bits}b/g{g}{'s' if self.symmetric else ''}"


DEFAULT_OPTIONS = "2,3,4,8"  # the bit widths a profile measures unless told
DEFAULT_GROUP_SIZES = "64"  # and their group sizes


def parse_group_sizes(spec: str | int | None) -> list[int | None]:
    """`"32,64,128,ch"` -> group sizes (`ch`: per-channel, None), in that order; InvalidInput otherwise."""
    out: list[int | None] = []
    for item in str(DEFAULT_GROUP_SIZES if spec is None else spec).split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            g = None if item in ("ch", "channel", "none") else int(item)
            Option(bits=4, group_size=g)
        except (ValueError, ValidationError):
            raise InvalidInput(f"bad --group-sizes {spec!r}: give comma-separated powers of two >= 8, or ch for "
                               f"per-channel, e.g. 32,64,128") from None
        if g not in out:
            out.append(g)
    if not out:
        raise InvalidInput(f"bad --group-sizes {spec!r}: give at least one, e.g. 64")
    return out


def parse_options(spec: str, group_sizes: str | int | None | Sequence[int | None] = 64,
                  symmetric: bool = False) -> list[Option]:
    """`"2,3,4,8"` at each of `group_sizes` (`parse_group_sizes`'s text, one size, or a list) -> every
    combination, sorted by bits then group (per-channel last); raises InvalidInput with the allowed values."""
    if group_sizes is None or isinstance(group_sizes, (list, tuple)):
        groups = [None] if group_sizes is None else list(group_sizes)
    else:
        groups = parse_group_sizes(group_sizes)
    try:
        bits = sorted({int(b) for b in spec.split(",") if b.strip()})
        options = [Option(bits=b, group_size=g, symmetric=symmetric) for b in bits for g in groups]
    except ValueError as e:
        raise InvalidInput(f"bad --options {spec!r}: give comma-separated bit widths from {ALLOWED_BITS}") from e
    # one 16-bit option whatever the groups: it stores no group
    unique = {(o.bits, None if not o.quantized else o.group_size): o for o in options}
    return sorted(unique.values(), key=lambda o: (o.bits, o.group_size or 1 << 30))


# ----------------------------------------------------------------------------------- quantizers

QuantizerMethod = Literal["rtn", "gptq", "llamacpp"]
QUANTIZER_METHODS: tuple[str, ...] = get_args(QuantizerMethod)
_QUANTIZER_EXAMPLE = "gptq:damp=0.05,block_size=64,act_order=false"


class Quantizer(BaseModel):
    """Where an option's ΔW comes from: round-to-nearest (`rtn`), GPTQ (`gptq`) with its settings, or
    llama.cpp's own quantization of GGUF types (`llamacpp`, the quantizer of GGUF options, `Option.gguf`).

    Part of what a profile means and of its id: a profile predicts the checkpoints its quantizer writes,
    and `apply` quantizes its plans with the same one (`kernels/quantize.py`).  The settings are GPTQ's
    (`kernels.quantize.gptq` says what each does and why these defaults) and `clip`, RTN's and GPTQ's:
    each group's range is searched for the least squared rounding error instead of being its min and max
    (`kernels.quantize._grid`).  `clip` at its default is left out of the dump, so a quantizer without it
    keeps the id it had before the setting existed; it is false unless given, which is what a stored
    profile without it was measured with.  An RTN quantizer takes `clip` alone, a llamacpp one none.
    `imatrix` (llamacpp only): the first 16 hex of the sha256 of the llama.cpp importance matrix that
    weighs each row's rounding, in the profile's ΔW as in `llama-quantize --imatrix` when `apply` writes
    the plan; the workspace keeps the file under that name.  Text form (`parse`, `label`): `rtn`,
    `rtn:clip=true`, `llamacpp`, `llamacpp:imatrix=<16 hex>`, `gptq`, `gptq:clip=true`,
    `gptq:damp=0.05,block_size=64,act_order=false`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: QuantizerMethod = "rtn"
    damp: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    block_size: int = Field(default=128, ge=1)
    act_order: bool = True
    clip: bool = False
    imatrix: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")

    @model_validator(mode="after")
    def _only_its_settings(self) -> "Quantizer":
        own = _METHOD_SETTINGS[self.method]
        if given := [k for k, v in self._all_settings().items() if k not in own and v != _default(k)]:
            whose = " and ".join(f"{m.upper()}'s" for m, names in _METHOD_SETTINGS.items()
                                 if any(k in names for k in given))
            raise ValueError(f"{self.method} takes {_settings_phrase(own)} ({', '.join(given)} given): "
                             f"they are {whose}, e.g. {_QUANTIZER_EXAMPLE!r}")
        if self.imatrix is not None and self.method != "llamacpp":
            raise ValueError(f"an importance matrix weighs llama.cpp's quantization only, not {self.method}'s")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        settings = {k: v for k, v in self.settings.items() if k != "clip" or v}
        return {"method": self.method} | settings | ({} if self.imatrix is None else {"imatrix": self.imatrix})

    def _all_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in type(self).model_fields if k not in ("method", "imatrix")}

    @property
    def settings(self) -> dict[str, Any]:
        """The keyword arguments of `kernels.quantize.gptq` or `rtn` (`{}` for llamacpp)."""
        return {k: getattr(self, k) for k in _METHOD_SETTINGS[self.method]}

    @property
    def label(self) -> str:
        """`rtn`, `llamacpp`, `gptq`, or `gptq:` and the settings that differ from the defaults; `parse` reads it back."""
        changed = [f"{k}={_setting_text(v)}" for k, v in self.settings.items() if v != _default(k)]
        if self.imatrix is not None:
            changed.append(f"imatrix={self.imatrix}")
        return self.method + (":" + ",".join(changed) if changed else "")

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str) -> "Quantizer":
        """`"rtn"`, `"gptq"` or `"gptq:damp=0.05,block_size=64,act_order=false"` (any subset of the settings,
        the rest at their defaults); anything else raises InvalidInput saying what to write."""
        spec = str(text).strip()
        method, colon, rest = (s.strip() for s in spec.partition(":"))
        if method not in QUANTIZER_METHODS:
            raise InvalidInput(f"unknown quantizer {text!r}: write 'rtn', 'llamacpp', 'gptq', or GPTQ with settings, "
                               f"e.g. {_QUANTIZER_EXAMPLE!r}")
        if method == "llamacpp" and colon:
            key, eq, value = (x.strip() for x in rest.partition("="))
            if key == "imatrix" and eq and re.fullmatch(r"[0-9a-f]{16}", value):
                return cls(method=method, imatrix=value)
            raise InvalidInput(f"bad quantizer {text!r}: write 'llamacpp', or 'llamacpp:imatrix=<the first 16 hex "
                               f"of the importance matrix's sha256>' (profile --imatrix FILE writes it)")
        own = _METHOD_SETTINGS[method]
        settings: dict[str, Any] = {}
        for item in rest.split(",") if colon else ():
            key, eq, value = (s.strip() for s in item.partition("="))
            if key not in own:
                raise InvalidInput(f"unknown {method} setting {key!r} in {text!r}: {method} takes "
                                   f"{_settings_phrase(own)}, e.g. {_QUANTIZER_EXAMPLE!r}")
            if not eq or key in settings:
                raise InvalidInput(f"bad quantizer {text!r}: give each setting once as key=value, "
                                   f"e.g. {_QUANTIZER_EXAMPLE!r}")
            settings[key] = _read_setting(key, value, text)
        try:
            return cls(method=method, **settings)
        except ValidationError as e:
            key = next((str(err["loc"][0]) for err in e.errors() if err["loc"]), "")
            rule = {"damp": "damp must be a finite number > 0", "block_size": "block_size must be an integer >= 1"}
            raise InvalidInput(f"bad quantizer {text!r}: {rule.get(key, _one_line(e))}, "
                               f"e.g. {_QUANTIZER_EXAMPLE!r}") from None


# the settings each method takes: the keyword arguments of its function in kernels/quantize.py
_METHOD_SETTINGS = {"rtn": ("clip",), "gptq": ("damp", "block_size", "act_order", "clip"), "llamacpp": ()}


def _settings_phrase(names: tuple[str, ...]) -> str:
    if not names:
        return "no settings"
    return "the setting " + names[0] if len(names) == 1 else f"the settings {', '.join(names[:-1])} and {names[-1]}"


def _default(setting: str) -> Any:
    return Quantizer.model_fields[setting].default


def _setting_text(v: Any) -> str:
    # repr: a float reads back as the same float
    return ("true" if v else "false") if isinstance(v, bool) else repr(v)


def _read_setting(key: str, value: str, text: str) -> Any:
    kind = type(_default(key))
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[value.lower()]
        return kind(value)
    except (KeyError, ValueError):
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise InvalidInput(f"bad quantizer {text!r}: {key}={value!r} must be {want}, "
                           f"e.g. {_QUANTIZER_EXAMPLE!r}") from None


# -------------------------------------------------------------------------------------- modules


class Module(BaseModel):
    """One quantizable weight matrix, `shape = [out_features, in_features]` as in nn.Linear."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, int]
    layer: int | None = None
    role: str = ""
    expert: int | None = None
    # MoE routing statistics of a routed expert's matrix on the calibration text (profiler/moe.py):
    # (token, slot) pairs routed to the expert, the mean and total routing weight its output was
    # multiplied by, and whether its error is the fallback for an expert that got no tokens.
    tokens_routed: int | None = None
    routing_weight: float | None = None
    routing_weight_total: float | None = None
    fallback: bool = False

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # Routing fields only where measured: a dense model's modules carry no MoE keys.
        d = handler(self)
        for k in ("tokens_routed", "routing_weight", "routing_weight_total", "fallback"):
            if d.get(k) is None or d.get(k) is False:
                d.pop(k, None)
        return d

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    fingerprint: str = ""
    source: str = ""  # path of the checkpoint or the embedded name; what `apply` loads


class CalibrationRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = ""
    fingerprint: str = ""
    n_tokens: int = 0
    seq_len: int = 0  # tokens per sequence; 0: not recorded (readers assume the default length)


# ------------------------------------------------------------------------------------- profiles


def _utc(v: datetime) -> datetime:
    """Naive timestamps are taken as UTC, so a round trip through storage compares equal."""
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


UTCDatetime = Annotated[datetime, AfterValidator(_utc)]


def _as_matrix(v: Any, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(v, dtype=dtype))


class Profile(BaseModel):
    """Sensitivity of every module at every option: `error[m, o]` and exact `size_bits[m, o]`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    id: str = ""
    model: ModelRef
    calibration: CalibrationRef = CalibrationRef()
    estimator: str  # the estimator alone: "calibrated", "fisher", "imatrix:<sha256 prefix>", ...
    quantizer: Quantizer = Quantizer()  # what ΔW came from, and what `apply` quantizes this profile's plans with
    device: str = "cpu"
    options: list[Option]
    modules: list[Module]
    error: np.ndarray  # [M, O] float64, predicted loss increase of quantizing module m with option o
    size_bits: np.ndarray  # [M, O] int64
    fixed_bits: int = 0  # everything not planned (embeddings, norms), counted in a ...MiB budget
    seconds: float = 0.0
    created_at: UTCDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    # Optional: seconds of one call of module m with option o at batch latency_batches[b], [M, O, B],
    # from `latency_source` ("roofline:H100" or "measured:<device name>"; profiler/latency.py).
    latency: np.ndarray | None = None
    latency_batches: list[int] = []
    latency_source: str = ""
    # Optional: modules whose error row is an estimate where the estimator meant to measure, and why
    # (module name -> reason; profiler/calibrate.py: too few routed tokens behind a measured KL).
    estimated: dict[str, str] = {}

    @field_validator("estimator")
    @classmethod
    def _estimator_alone(cls, v: str) -> str:
        if "/" in v:
            name, _, method = v.partition("/")
            raise ValueError(f"estimator {v!r} carries a quantizer: give estimator {name!r} and the quantizer "
                             f"apart (quantizer {{'method': {method!r}}})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if "error" in data:
                data["error"] = _as_matrix(data["error"], np.float64)
            if "size_bits" in data:
                data["size_bits"] = _as_matrix(data["size_bits"], np.int64)
            if data.get("latency") is not None:
                data["latency"] = _as_matrix(data["latency"], np.float64)
        return data

    @model_validator(mode="after")
    def _check(self) -> "Profile":
        M, O = len(self.modules), len(self.options)
        if M == 0 or O == 0:
            raise ValueError("a profile needs at least one module and one option")
        for what, arr in (("error", self.error), ("size_bits", self.size_bits)):
            if arr.shape != (M, O):
                raise ValueError(f"{what} has shape {arr.shape}, expected [modules={M}, options={O}]")
        if not np.all(np.isfinite(self.error)) or np.any(self.error < 0):
            raise ValueError("error must be finite and >= 0")
        if np.any(self.size_bits <= 0):
            raise ValueError("size_bits must be > 0")
        self._check_latency(M, O)
        names = [m.name for m in self.modules]
        if len(set(names)) != M:
            dup = sorted({n for n in names if names.count(n) > 1})[:3]
            raise ValueError(f"duplicate module names: {dup}")
        if unknown := sorted(set(self.estimated) - set(names)):
            raise ValueError(f"estimated names modules the profile does not have: {unknown[:3]}")
        return self

    def _check_latency(self, M: int, O: int) -> None:
        if self.latency is None:
            if self.latency_batches or self.latency_source:
                raise ValueError("latency_batches and latency_source come only with a latency table")
            return
        B = len(self.latency_batches)
        if B == 0 or any(b <= 0 for b in self.latency_batches) or self.latency_batches != sorted(
                set(self.latency_batches)):
            raise ValueError(f"latency_batches must be increasing positive batch sizes, got {self.latency_batches}")
        if self.latency.shape != (M, O, B):
            raise ValueError(f"latency has shape {self.latency.shape}, expected [modules={M}, options={O}, "
                             f"batches={B}]")
        if not np.all(np.isfinite(self.latency)) or np.any(self.latency <= 0):
            raise ValueError("latency must be finite and > 0 seconds")
        if not self.latency_source:
            raise ValueError("a latency table needs its latency_source, e.g. 'roofline:H100'")

    def __eq__(self, other: object) -> bool:
        # pydantic's field-wise == would ask numpy arrays for a truth value
        if not isinstance(other, Profile):
            return NotImplemented
        skip = {"error", "size_bits", "latency"}
        same_latency = (self.latency is None and other.latency is None) or (
            self.latency is not None and other.latency is not None and np.array_equal(self.latency, other.latency))
        return (self.model_dump(exclude=skip) == other.model_dump(exclude=skip) and same_latency
                and np.array_equal(self.error, other.error) and np.array_equal(self.size_bits, other.size_bits))

    __hash__ = None  # arrays inside: not hashable

    @property
    def n_params(self) -> int:
        """Weights the plan assigns (the denominator of bits per weight)."""
        return sum(m.numel for m in self.modules)

    @property
    def plan_embeddings(self) -> bool:
        """Whether the profile covers the input embedding (and a tied head with it), or leaves it in
        `fixed_bits`.  Read from the modules, so a stored row or file needs no field of its own."""
        return any(m.role == EMBED_ROLE for m in self.modules)

    def to_dict(self) -> dict:
        """The interchange format `bitplan.profile/2` (docs/formats.md); the latency keys and `estimated` are
        optional there, written only when the profile has a latency table or estimated rows."""
        d = {
            "format": PROFILE_FORMAT,
            "id": self.id,
            "model": self.model.model_dump(),
            "calibration": self.calibration.model_dump(),
            "estimator": self.estimator,
            "quantizer": self.quantizer.model_dump(),
            "device": self.device,
            "options": [o.model_dump() for o in self.options],
            "modules": [
                {**m.model_dump(), "shape": list(m.shape), "error": self.error[i].tolist(),
                 "size_bits": self.size_bits[i].tolist()}
                for i, m in enumerate(self.modules)
            ],
            "fixed_bits": self.fixed_bits,
            "seconds": self.seconds,
            "created_at": self.created_at.isoformat(),
        }
        if self.estimated:
            d["estimated"] = dict(self.estimated)
        if self.latency is not None:
            d["latency_source"], d["latency_batches"] = self.latency_source, list(self.latency_batches)
            for i, m in enumerate(d["modules"]):
                m["latency"] = self.latency[i].tolist()  # [option][batch], seconds
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Profile":
        """Parse `bitplan.profile/2`, or `/1`; any defect raises InvalidInput naming the field."""
        if not isinstance(d, dict):
            raise InvalidInput("a profile file must be a JSON object")
        if d.get("format") not in (PROFILE_FORMAT, PROFILE_FORMAT_1):
            raise InvalidInput(f"profile format must be {PROFILE_FORMAT!r} (or {PROFILE_FORMAT_1!r}), "
                               f"got {d.get('format')!r}")
        try:
            mods = d["modules"]
            if not isinstance(mods, list):
                raise TypeError("modules must be a list")
            fields = {k: v for k, v in d.items() if k not in ("format", "modules")}
            if d["format"] == PROFILE_FORMAT_1 and isinstance(fields.get("estimator"), str):
                fields["estimator"], _, method = fields["estimator"].partition("/")
                fields["quantizer"] = _PROFILE_1_GPTQ if method == "gptq" else {"method": method or "rtn"}
            fields["modules"] = [{k: m[k] for k in m if k not in ("error", "size_bits", "latency")} for m in mods]
            fields["error"] = [m["error"] for m in mods]
            fields["size_bits"] = [m["size_bits"] for m in mods]
            if any("latency" in m for m in mods):
                fields["latency"] = [m["latency"] for m in mods]
            fields.setdefault("model", {"name": "unknown"})
            return cls.model_validate(fields)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"malformed profile: {_one_line(e)}") from e

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"malformed profile JSON: {e}") from e
        return cls.from_dict(d)


# the settings of every GPTQ profile in the /1 format, whatever the defaults are now
_PROFILE_1_GPTQ = {"method": "gptq", "damp": 0.1, "block_size": 128, "act_order": True}


# -------------------------------------------------------------------------------------- budgets

# unit -> bytes per unit; bpw is relative to the planned weights, not a size
_UNITS = {"bpw": None, "bits": 1 / 8, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_MAX_BUDGET_BITS = 2.0**62  # sizes are int64 bit counts
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*$")


class Budget(BaseModel):
    """A memory budget: average bits per planned weight (`3.5bpw`) or a whole-checkpoint size (`900MiB`)."""

    model_config = ConfigDict(frozen=True)

    value: float
    unit: str

    @classmethod
    def parse(cls, text: str) -> "Budget":
        shown = str(text)[:40]  # a message quotes a short prefix of what it was given, never all of it
        m = _BUDGET_RE.match(str(text))
        unit = m and (m.group(2) if m.group(2) in _UNITS else
                      next((u for u in _UNITS if u.lower() == m.group(2).lower()), None))
        if not m or unit is None:
            raise InvalidInput(f"bad budget {shown!r}: write e.g. '3.5bpw', '900MiB', '0.9GiB' or '120MB'")
        if unit not in ("bpw", "bits") and m.group(2).endswith("b"):
            # a lower-case b is a bit in 40Gb or 40Mb: a size in bits or in bytes, ambiguous by a factor of 8
            raise InvalidInput(f"bad budget {shown!r}: {m.group(2)!r} reads as bits (b) where sizes are bytes (B): "
                               f"write e.g. '{m.group(1)}{unit}' for bytes")
        value = float(m.group(1))
        if not value > 0:
            raise InvalidInput(f"bad budget {shown!r}: it must be positive")
        if not math.isfinite(value) or value * (1 if unit == "bpw" else _UNITS[unit] * 8) > _MAX_BUDGET_BITS:
            raise InvalidInput(f"bad budget {shown!r}: too large to be a budget (at most {_MAX_BUDGET_BITS:.3g} "
                               f"bits, or as many bits per weight)")
        return cls(value=value, unit=unit)

    def __str__(self) -> str:
        return f"{self.value:.15g}{self.unit}"  # every digit of a byte-exact budget

    def planned_bits(self, n_params: int, fixed_bits: int) -> int:
        """Bits available to the planned modules: a bpw budget counts them alone, a size budget everything."""
        if self.unit == "bpw":
            return math.floor(self.value * n_params)
        return math.floor(self.value * _UNITS[self.unit] * 8) - fixed_bits

    def describe_bits(self, planned_bits: int, n_params: int, fixed_bits: int) -> str:
        """Express a planned-bits amount in this budget's own unit (for error messages)."""
        if self.unit == "bpw":
            return f"{math.ceil(planned_bits / n_params * 1000) / 1000:g}bpw"
        scale = _UNITS[self.unit] * 8
        return f"{math.ceil((planned_bits + fixed_bits) / scale * 1000) / 1000:g}{self.unit}"


# ---------------------------------------------------------------------------------------- plans


class Plan(BaseModel):
    """Module -> option, with what it predicts and how it was found. One type from allocator to disk."""

    model_config = ConfigDict(frozen=True)

    id: str
    profile_id: str
    model: ModelRef
    budget: str
    budget_bits: int  # bits available to the planned modules
    allocator: str
    params: dict[str, Any] = {}
    pins: list[str] = []
    assignment: dict[str, Option]
    total_bits: int  # planned modules only
    fixed_bits: int = 0
    n_params: int
    bits_per_weight: float
    predicted_error: float
    status: str  # "optimal" | "feasible (gap g)" | "heuristic" | ...
    solve_seconds: float
    created_at: UTCDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    # Seconds per forward pass of the planned modules at each batch of the profile's latency table
    # (None: the profile has none), and where that table came from.
    predicted_latency: dict[int, float] | None = None
    latency_source: str | None = None

    @property
    def size_mib(self) -> float:
        """Whole checkpoint (planned + fixed), MiB."""
        return (self.total_bits + self.fixed_bits) / 8 / 2**20

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json")
        d["format"] = PLAN_FORMAT
        d["size_mib"] = self.size_mib
        d["assignment"] = {k: o.model_dump() for k, o in self.assignment.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Plan":
        if not isinstance(d, dict):
            raise InvalidInput("a plan file must be a JSON object")
        try:
            return cls.model_validate({k: v for k, v in d.items() if k not in ("format", "size_mib")})
        except ValueError as e:
            raise InvalidInput(f"malformed plan: {_one_line(e)}") from e


class Evaluation(BaseModel):
    """What was measured on a checkpoint: perplexity on a named corpus, size on disk, time taken."""

    model_config = ConfigDict(frozen=True)

    id: str = ""
    plan_id: str | None = None
    checkpoint: str
    corpus: str
    n_tokens: int
    window: int
    perplexity: float
    bytes_on_disk: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    # on a GPU: decode tokens/s and peak memory per batch size, the bf16 baseline's beside them
    # (`executor.evaluate.decode_speed`); None where not measured
    speed: dict[str, Any] | None = None
    # who measured it: bitplan's evaluator, or llama.cpp's `llama-perplexity` (its own windows: each
    # scores the second half of its tokens, with the first half as context)
    engine: Literal["bitplan", "llamacpp"] = "bitplan"
    kl_divergence: float | None = None  # mean KL to the base model's next-token distribution, nats per token
    created_at: UTCDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))


Kind = Literal["profile", "plan", "evaluation"]


# ---------------------------------------------------------------------------------------- utils


def content_id(*parts: Any, prefix: str = "") -> str:
    """A short stable id from JSON-able parts: same inputs, same id."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return prefix + h[:16]


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
