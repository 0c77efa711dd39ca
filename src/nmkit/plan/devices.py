"""Device files: a YAML (or JSON) list of the devices to plan for, each checked completely up front.

.. code-block:: yaml

    devices:
      - {name: this-cpu, kind: cpu, threads: 2}              # measured (nmkit plan --profile)
      - {name: a100, kind: nvidia-sparse-tensor-core, peak_tflops: 312, mem_gbps: 1555}
      - {name: sta, kind: nm-accelerator, macs: 1024, freq_mhz: 500, dram_gbps: 25.6, buffer_kib: 512}

A single device may also be given as the top-level mapping. Optional fields and their defaults are the
dataclass fields of :mod:`nmkit.plan.cost`; docs/plan.md documents each and its source.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from nmkit.errors import UserError
from nmkit.patterns import NM, PatternError
from nmkit.plan.cost import DENSE, NMAccelerator, SparseTensorCoreGPU

MODELLED = {"nvidia-sparse-tensor-core": SparseTensorCoreGPU, "nm-accelerator": NMAccelerator}
KINDS = ("cpu", *MODELLED)


@dataclass(frozen=True)
class CpuDevice:
    """The measured CPU model of this machine (built from a profile by the command)."""

    name: str = "cpu"
    threads: int = 2


def _fields(cls) -> tuple[list[str], list[str]]:
    names = [f.name for f in fields(cls) if f.init]
    required = [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING]
    return names, required


def _number(where: str, key: str, value, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UserError(f"{where}: {key} must be a {'whole ' if integer else ''}number, got {value!r}")
    if value <= 0:
        raise UserError(f"{where}: {key} must be positive, got {value!r}")
    return value


def _patterns(where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: patterns must be a non-empty list such as ['dense', '2:4']")
    out = []
    for p in value:
        try:
            out.append(DENSE if str(p) == DENSE else str(NM.parse(str(p))))
        except PatternError:
            raise UserError(f"{where}: pattern {p!r} is not 'dense' or N:M (keep N of every M, e.g. 2:4)") from None
    return tuple(out)


def device_from_dict(entry: dict, where: str):
    """One device entry -> a CpuDevice or a modelled cost model; one clear error for anything missing."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: a device must be a mapping with name and kind, got {entry!r}")
    name = entry.get("name")
    where = f"{where} ({name})" if name else where
    kind = entry.get("kind")
    if not name or not kind:
        raise UserError(f"{where}: device is missing '{'name' if not name else 'kind'}' (kind: one of "
                        f"{', '.join(KINDS)})")
    if kind not in KINDS:
        raise UserError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    cls = CpuDevice if kind == "cpu" else MODELLED[kind]
    names, required = _fields(cls)
    params = {k: v for k, v in entry.items() if k != "kind"}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} for kind {kind}; fields: {', '.join(names)}")
    missing = [k for k in required if k not in params]
    if missing:
        raise UserError(f"{where}: kind {kind} is missing field{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(m) for m in missing)}")
    types = {f.name: f.type for f in fields(cls)}
    for key, value in params.items():
        if key == "name":
            params[key] = str(value)
        elif key == "patterns":
            params[key] = _patterns(where, value)
        else:
            params[key] = _number(where, key, value, integer=types[key] == "int")
    return cls(**params)


def load(path: str | Path) -> list:
    """Read and check a device file; a list of devices in file order."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"device file {str(path)!r} does not exist (give --device cpu or a YAML device file)")
    try:
        body = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"device file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = body.get("devices") if isinstance(body, dict) and "devices" in body else [body]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"device file {str(path)!r}: 'devices' must be a non-empty list")
    devices = [device_from_dict(e, f"device file {path.name}, device {i + 1}") for i, e in enumerate(entries)]
    seen = set()
    for d in devices:
        if d.name in seen:
            raise UserError(f"device file {path.name}: two devices are named {d.name!r}; names must differ")
        seen.add(d.name)
    return devices
