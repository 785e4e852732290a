"""A CPU-backed stand-in for Apple's MPS device, for tests on machines without one.

Tensors on the fake device report ``device="mps"`` (a wrapper subclass) while their data lives on the CPU. What
MPS refuses, they refuse, with MPS's own error: any float64 tensor, input, output or ``dtype=`` on the device
(``TypeError: Cannot convert a MPS Tensor to float64 dtype ...``), a mix of device and CPU tensors in one op (as
on any accelerator; 0-d CPU tensors allowed), and ``.numpy()``. Factories with ``device="mps"``, ``.to("mps")``,
``nn.Module.to("mps")`` and ``torch.load(..., map_location="mps")`` make such tensors; ``.cpu()`` unwraps them. It
checks dtypes and devices, not which ops MPS implements. ``FakeMPSAccelerator`` lets a real Lightning ``Trainer``
run on it (with ``inference_mode=False``: wrapper tensors cannot be inference tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lightning.pytorch.accelerators import MPSAccelerator
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

MPS = torch.device("mps")
NO_FLOAT64 = (
    "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. "
    "Please use float32 instead."
)
aten = torch.ops.aten


class FakeMPSTensor(torch.Tensor):
    """A CPU tensor (``elem``) that says it is on ``mps``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> FakeMPSTensor:
        assert type(elem) is torch.Tensor and elem.device.type == "cpu"
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=MPS,
            requires_grad=False,
        )
        r.elem = elem
        return r

    def __repr__(self) -> str:
        return f"FakeMPS({self.elem!r})"

    def requires_grad_(self, requires_grad: bool = True) -> FakeMPSTensor:
        return self  # no autograd on the fake device (DN2 only runs inference)

    # a traceable wrapper subclass: nn.Module._apply swaps parameters instead of setting .data
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: None, outer_size: object, outer_stride: object) -> FakeMPSTensor:
        return FakeMPSTensor(inner["elem"])

    # scalar reads would open an MPS device guard in C++ (this build has none): read the CPU data
    def item(self) -> float | int | bool:
        return self.elem.item()

    def __float__(self) -> float:
        return float(self.elem)

    def __int__(self) -> int:
        return int(self.elem)

    def __index__(self) -> int:
        return self.elem.__index__()

    def __bool__(self) -> bool:
        return bool(self.elem)

    def tolist(self) -> object:
        return self.elem.tolist()

    def __format__(self, spec: str) -> str:
        return self.elem.__format__(spec)

    def numpy(self, *args: object, **kwargs: object) -> object:
        raise TypeError("can't convert mps:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_mps(device: object) -> bool:
    return device is not None and torch.device(device).type == "mps"


def _unwrap(t: object) -> object:
    return t.elem if isinstance(t, FakeMPSTensor) else t


def _wrap(t: object) -> object:
    return FakeMPSTensor(t) if type(t) is torch.Tensor else t


def _run(func, args: tuple, kwargs: dict) -> object:
    """One aten op touching the fake device: checked as MPS would, run on the CPU data, results wrapped."""
    flat, _ = tree_flatten((args, kwargs))
    fakes = [t for t in flat if isinstance(t, FakeMPSTensor)]
    plain = [t for t in flat if type(t) is torch.Tensor]
    target = kwargs.get("device")  # a device argument wins (factories, _to_copy), else the inputs'
    on_mps = _on_mps(target) if target is not None else bool(fakes)
    if on_mps or fakes:
        copies = func in (aten._to_copy.default, aten.copy_.default)
        if fakes and target is None and not copies and any(t.dim() > 0 for t in plain):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found mps:0 and cpu ({func})")
        dtypes = {t.dtype for t in fakes} | {v for v in flat if isinstance(v, torch.dtype)}
        if on_mps:
            dtypes |= {t.dtype for t in plain}  # a CPU float64 tensor copied onto the device
        if torch.float64 in dtypes:
            raise TypeError(f"{NO_FLOAT64} ({func})")
    if func is aten.copy_.default:  # dst.copy_(src) across devices
        dst, src = args[0], args[1]
        crosses = isinstance(dst, FakeMPSTensor) or isinstance(src, FakeMPSTensor)
        if crosses and torch.float64 in (dst.dtype, src.dtype):
            raise TypeError(f"{NO_FLOAT64} ({func})")
    host_kwargs = {**kwargs, "device": torch.device("cpu")} if _on_mps(kwargs.get("device")) else kwargs
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, host_kwargs))
    if not on_mps:
        return out
    schema = func._schema
    if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        for a in fakes:  # in-place and out= ops return their (already wrapped) argument
            if isinstance(out, torch.Tensor) and a.elem is out:
                return a
    return tree_map(_wrap, out)


class _FakeMPSDispatch(TorchDispatchMode):
    """Factories with ``device="mps"`` and CPU-to-mps copies; ops on fake tensors go through ``_run`` too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(t, FakeMPSTensor) for t in flat) or _on_mps(kwargs.get("device")):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


def _parse_to(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, str | torch.device):
            device = torch.device(a)
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
    return (torch.device(device) if device is not None else None), dtype


def _tensor_to(tensor: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None, copy: bool) -> object:
    """``Tensor.to`` to or from the fake device; ``NotImplemented`` when neither side is it."""
    source_mps = isinstance(tensor, FakeMPSTensor)
    target_mps = device.type == "mps" if device is not None else source_mps
    if not (source_mps or target_mps):
        return NotImplemented
    dtype = dtype or tensor.dtype
    if torch.float64 in (dtype, tensor.dtype):
        raise TypeError(f"{NO_FLOAT64} (Tensor.to)")
    if source_mps == target_mps and dtype == tensor.dtype and not copy:
        return tensor
    data = _unwrap(tensor)
    out = data.to(dtype=dtype, copy=copy)
    if out is data and source_mps != target_mps:
        out = out.clone()  # a copy across devices never aliases
    return FakeMPSTensor(out) if target_mps else out


class _FakeMPSFunctions(TorchFunctionMode):
    """Python entry points whose C++ bindings open a device guard before dispatching (this build has no MPS
    guard): done here on the CPU data, through the same checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _on_mps(kwargs.get("device")):
            if isinstance(args[0], torch.Tensor) and func is not torch.tensor:
                return _tensor_to(args[0], MPS, kwargs.get("dtype"), False)
            out = func(*args, **{**kwargs, "device": "cpu"})
            if out.dtype == torch.float64:
                raise TypeError(f"{NO_FLOAT64} ({func.__name__})")
            return FakeMPSTensor(out if out is not args[0] else out.clone())
        if func is torch.Tensor.to:
            device, dtype = _parse_to(args[1:], kwargs)
            out = _tensor_to(args[0], device, dtype, bool(kwargs.get("copy")))
            if out is not NotImplemented:
                return out
        if func is torch.Tensor.__getitem__ and isinstance(args[0], FakeMPSTensor):
            return _wrap(args[0].elem[tree_map(_unwrap, args[1])])
        if func is torch.Tensor.__setitem__ and isinstance(args[0], FakeMPSTensor):
            value = args[2]
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise TypeError(f"{NO_FLOAT64} (Tensor.__setitem__)")
            if type(value) is torch.Tensor and value.dim() > 0:
                raise RuntimeError("Expected all tensors to be on the same device, but found mps:0 and cpu")
            args[0].elem[tree_map(_unwrap, args[1])] = _unwrap(value)
            return None
        if func is torch.Tensor.__setitem__ and isinstance(args[2], FakeMPSTensor) and args[2].dim() > 0:
            raise RuntimeError("Expected all tensors to be on the same device, but found cpu and mps:0")
        try:
            return func(*args, **kwargs)
        except RuntimeError as error:
            # a C++ binding opened a device guard for 'mps' (none in this build): run it on the CPU data, every
            # tensor of the call counting as a device tensor, and wrap what it returns
            flat, _ = tree_flatten((args, kwargs))
            guarded = "not linked with support for mps" in str(error)
            if not guarded or not any(isinstance(t, FakeMPSTensor) for t in flat):
                raise
            if any(type(t) is torch.Tensor and t.dim() > 0 for t in flat):
                raise RuntimeError(f"Expected all tensors on the same device, found mps:0 and cpu ({func})") from None
            with _AllOnMPS():
                out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
            return tree_map(_wrap, out)


class _AllOnMPS(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten((args, kwargs, out))
        if any(t is torch.float64 or isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in flat):
            raise TypeError(f"{NO_FLOAT64} ({func})")
        return out


def _load_onto_mps(load):  # noqa: ANN001, ANN202
    """``torch.load`` whose ``map_location="mps"`` (this build cannot restore storages there) loads onto the CPU, then
    moves every tensor onto the fake device, refusing float64 as MPS does."""

    def load_to(*args, map_location=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if map_location is None or not isinstance(map_location, str | torch.device) or not _on_mps(map_location):
            return load(*args, map_location=map_location, **kwargs)
        loaded = load(*args, map_location="cpu", **kwargs)
        return tree_map(lambda t: t.to(MPS) if type(t) is torch.Tensor else t, loaded)

    return load_to


@contextlib.contextmanager
def fake_mps() -> Iterator[None]:
    """Within the block, ``"mps"`` is a device whose tensors live on the CPU but refuse float64 as MPS does."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # module.to(): parameters change type both ways
    load, torch.load = torch.load, _load_onto_mps(torch.load)
    try:
        with _FakeMPSFunctions(), _FakeMPSDispatch():
            yield
    finally:
        torch.load = load
        torch.__future__.set_swap_module_params_on_conversion(swap)


class FakeMPSAccelerator(MPSAccelerator):
    """Lightning's MPS accelerator, available on the fake device."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_parallel_devices(devices: object) -> list[torch.device]:
        return [MPS]

    @staticmethod
    def parse_devices(devices: object) -> list[int]:
        return [0]

    def get_device_stats(self, device: object) -> dict:
        return {}
