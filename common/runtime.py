"""What every command-line tool shares: the device rule, TF32, quiet library notices and one-sentence errors.

- `require_device(model, allow_cpu, what)`: a real (not synthetic: `is_synthetic`) model with no usable CUDA stops before
  anything is loaded, naming what was found and how to allow the CPU.
- `enable_tf32()`: TF32 matmuls and convolutions on Ampere+ GPUs (fp32 weights and fp32 LoRA maths get tensor cores).
- `quiet_libraries()`: drops diffusers' vacuous "should be kept in float32: []" notice printed on every `.to(dtype)`.
- `cli(main)`: runs a tool's `main`; a config error, a missing file, a bad checkpoint or a refused device prints
  `error: <one sentence>` on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence


class DeviceError(RuntimeError):
    """A real model would run on the CPU without the user asking for it."""


class UsageError(ValueError):
    """A command-line combination that cannot work (the message says what to pass instead)."""


def synthetic_models() -> set[str]:
    """Model names that are built in the process (random tiny SD shapes, the plug-ins' synthetic worlds): CPU-sized by
    design. They are the model sources registered `synthetic` (`common.models.MODEL_SOURCES`)."""
    from common.models import MODEL_SOURCES

    return MODEL_SOURCES.synthetic()


def is_synthetic(model: str) -> bool:
    """True for a synthetic model source, with or without `:SEED` (`tiny`, `tiny-sdxl:3`, the toy world)."""
    from common.models import model_source

    source = model_source(model)
    return source is not None and source[0] in synthetic_models()


def cuda_report() -> str:
    """What this process sees of CUDA, in a few words (for error messages)."""
    import torch

    built = torch.version.cuda
    if not built:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        n = torch.cuda.device_count()
    except Exception as e:  # noqa: BLE001 - a broken driver raises many kinds of errors; all mean "not usable"
        return f"torch {torch.__version__} (CUDA {built}) cannot talk to the driver ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {built}) finds no usable GPU (torch.cuda.is_available() is False, " \
               f"{n} device(s) counted; an older driver than CUDA {built} needs shows this)"
    return f"torch {torch.__version__} (CUDA {built}) sees {n} GPU(s)"


def require_device(model: str, allow_cpu: bool, how_to_allow: str, device: str | None = None) -> str:
    """The device to run `model` on: "cuda" when usable; "cpu" for a synthetic model, when `allow_cpu` is set or when
    `device` asks for it explicitly; otherwise DeviceError naming what was found and `how_to_allow` (e.g. "set
    train.allow_cpu: true"). Called before any weights are loaded."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceError(f"device '{device}' was asked for, but {cuda_report()}")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if allow_cpu or is_synthetic(model):
        return "cpu"
    raise DeviceError(f"model '{model}' would run on the CPU: {cuda_report()}; to run it on the CPU anyway, "
                      f"{how_to_allow}")


CPU_CHUNK = 8
"""images per call of a convolutional judge (face detector, attribute classifier) on the CPU: a larger batch leaves
the caches and runs slower per image than one at a time (`make bench`: judges_batched_speedup)"""


def device_chunks(n: int, device) -> list[slice]:
    """Slices of `n` items for one judge call each: `CPU_CHUNK` at a time on the CPU, all at once elsewhere."""
    import torch

    step = CPU_CHUNK if torch.device(device).type == "cpu" else max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def enable_tf32() -> None:
    """Allow TF32 tensor-core maths for fp32 matmuls and cuDNN convolutions (no effect on the CPU)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class _VacuousFp32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "should be kept in float32: []" not in msg


def quiet_libraries() -> None:
    """Silence diffusers' `.to(dtype)` notice when the model has no fp32 modules to keep (it prints it for `[]`)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _VacuousFp32Notice) for f in logger.filters):
        logger.addFilter(_VacuousFp32Notice())


def _user_errors() -> tuple[type[BaseException], ...]:
    from common.config import ConfigError

    # OSError covers missing files and folders, and the loaders' "could not load <hub id>" sentences
    errors: list[type[BaseException]] = [ConfigError, DeviceError, UsageError, KeyError, OSError]
    try:
        from common.adapters import CheckpointError

        errors.append(CheckpointError)
    except ImportError:  # pragma: no cover - adapters always imports; kept so a broken install still reports
        pass
    return tuple(errors)


def one_sentence(e: BaseException) -> str:
    """The first line of an exception's message (a KeyError's repr quotes removed)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__
    return msg


def cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a tool's `main(argv)` as a command: user errors become `error: <sentence>` on stderr and exit code 2."""
    quiet_libraries()
    try:
        rc = main(argv)
    except _user_errors() as e:
        print(f"error: {one_sentence(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(rc, int) and not isinstance(rc, bool) and rc:
        raise SystemExit(rc)
