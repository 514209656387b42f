"""An emulated GPU for tests: a compute device that is not the host, on a machine without CUDA.

On the CPU platform every tensor lives on the CPU, so a whole class of GPU bugs cannot show: a tensor
moved to the host before an NCCL collective, a helper made on the CPU (``torch.eye(n)``, a bool mask, an
``arange``) combined with model tensors, ``.numpy()`` on a model tensor, a file saved from the device and
loaded without ``map_location``. Each of them runs on CPU + gloo and fails on the first CUDA + NCCL run.

With ``NEMO_MINITRON_EMULATE_GPU=1`` (and no CUDA) :func:`activate` makes the compute device a separate
device type, ``emulated_gpu`` (torch's PrivateUse1 key, registered as a Python backend): every tensor our
code or megatron puts on "the GPU" (``platform.device()``, ``torch.cuda.current_device()``, ``.cuda()``,
``device="cuda"``) lives there. Its data is a CPU tensor inside a wrapper (:class:`DeviceTensor`), and
every operation is run on that CPU data after checking the rules CUDA enforces:

- an operation with tensor arguments on both the device and the host fails as on CUDA ("Expected all
  tensors to be on the same device"), with CUDA's own exceptions: 0-dim host tensors (scalars), host index
  tensors indexing a device tensor, and copies between the two (``copy_``, ``.to()``, ``.cpu()``);
- ``.numpy()`` of a device tensor fails (``TypeError``, as on CUDA); ``.item()`` and ``.tolist()`` work;
- a collective called from this package (``nemo_minitron.*``) over an NCCL-like group refuses host
  tensors (NCCL's rule: "Tensors must be CUDA and dense"), and ``all_gather_object`` /
  ``broadcast_object_list`` from this package refuse device tensors inside the objects (with NCCL they
  arrive on the sender's GPU);
- a device tensor cannot be pickled (``torch.save``, object collectives), wherever it is called from: stricter
  than CUDA, which writes a device tensor with its device, so that files hold host copies and load anywhere;
- ``torch.load`` without ``map_location``, called from this package, fails: a load says where its tensors go.

Collectives then run over gloo on the CPU data. What it cannot catch: kernels that exist only on CUDA
(fused kernels, Transformer Engine, FP8), streams and asynchronous execution (every operation is
synchronous here), the CUDA memory limit, and more than one GPU per process (every rank's device is
``emulated_gpu:0``). Megatron's and NeMo's own code runs under the same rules, so a failure there means
they took a path they never take on CUDA (a CPU-platform accommodation that was not switched over).

Nothing here is active unless the variable is set, and never when CUDA is present.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

NAME = "emulated_gpu"
ENV = "NEMO_MINITRON_EMULATE_GPU"
_ACTIVE = [False]
HOST_READS = [0]  # device-to-host copies so far (.item(), .tolist(), .cpu(), bool(t)): each one a sync on CUDA
_HOST = torch.device("cpu")
aten = torch.ops.aten


def requested() -> bool:
    return os.environ.get(ENV) == "1" and not torch.cuda.is_available()


def active() -> bool:
    return _ACTIVE[0]


def device() -> torch.device:
    return torch.device(NAME, 0)


_DATA = torch._C.TensorBase.__dict__["data"]
_ITEM = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)


def _host_index(index):
    """Python sequences in an index as host index tensors (as CUDA, which copies them to the device)."""
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
    return index


class DeviceMismatch(RuntimeError):
    """An operation mixed tensors of the emulated GPU and the host where CUDA refuses it."""


class DeviceTensor(torch.Tensor):
    """A tensor on the emulated GPU: ``.data_`` holds its values on the CPU."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        assert not isinstance(data, DeviceTensor)
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                                storage_offset=data.storage_offset(), dtype=data.dtype,
                                                layout=data.layout, device=device(), requires_grad=False)
        t.data_ = data
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is _DATA and func.__name__ == "__set__":
            # ``t.data = other`` (megatron's make_viewless_tensor, its gradient buffers): the data follows
            self, new = args
            with torch._C.DisableTorchFunctionSubclass():
                func(self, new)
            self.data_ = new.data_ if _is_dev(new) else new
            return None
        if func in _ITEM and len(args) > 1:  # t[[1, 2]]: torch builds the index on t's device, modes off
            args = (args[0], _host_index(args[1]), *args[2:])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __repr__(self, *, tensor_contents=None):
        return f"DeviceTensor({self.data_!r}, device='{NAME}:0')"

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {NAME}:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                        "tensor to host memory first.")

    __array__ = numpy

    def tolist(self):  # a device-to-host copy, allowed on CUDA
        HOST_READS[0] += 1
        return self.data_.tolist()

    def __reduce_ex__(self, protocol):
        raise pickle.PicklingError(
            f"a {NAME} tensor is being pickled (torch.save, all_gather_object, broadcast_object_list): on a "
            "GPU it is written or sent with its device, and loads onto the writer's or sender's GPU; copy it "
            "to the host first (.cpu())")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # only reached with the mode inactive
        with _Mode():
            return func(*args, **(kwargs or {}))


def _is_dev(x) -> bool:
    return isinstance(x, DeviceTensor)


def _is_emulated(dev) -> bool:
    if dev is None:
        return False
    return torch.device(dev).type == NAME if isinstance(dev, (str, torch.device)) else False


_CROSS_DEVICE_OK = {aten.copy_.default, aten._to_copy.default, aten._local_scalar_dense.default,
                    aten.detach.default, aten.alias.default, aten.lift_fresh.default,
                    aten.lift_fresh_copy.default, aten._has_compatible_shallow_copy_type.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}


class _Mode(TorchDispatchMode):
    """Runs every operation on the CPU data of device tensors, after checking CUDA's placement rules."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is aten._to_copy.default:
            return self._to(args[0], kwargs, func)
        if func is aten._local_scalar_dense.default and _is_dev(args[0]):
            HOST_READS[0] += 1
        dev_arg = kwargs.get("device")
        on_device = False
        if dev_arg is not None and _is_emulated(dev_arg):
            kwargs["device"] = _HOST
            on_device = True
        flat, _ = tree_flatten((args, kwargs))
        has_dev = any(_is_dev(x) for x in flat)
        if has_dev and func not in _CROSS_DEVICE_OK and not str(func).startswith("c10d."):
            self._check_same_device(func, args, flat)
        if not has_dev:
            out = func(*args, **kwargs)
            return tree_map(lambda x: DeviceTensor(x) if isinstance(x, torch.Tensor) else x, out) if on_device \
                else out
        inner = {}

        def unwrap(x):
            if _is_dev(x):
                inner[id(x.data_)] = x
                return x.data_
            return x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        wrap_new = on_device or dev_arg is None

        def rewrap(x):
            if not isinstance(x, torch.Tensor) or _is_dev(x):
                return x
            same = inner.get(id(x))
            if same is not None:  # an in-place operation returns its argument: the same device tensor
                return same
            return DeviceTensor(x) if wrap_new else x

        return tree_map(rewrap, out)

    @staticmethod
    def _to(src, kwargs, func):
        dev = kwargs.get("device")
        data = src.data_ if _is_dev(src) else src
        if dev is None:
            out = func(data, **kwargs)
            return DeviceTensor(out) if _is_dev(src) else out
        if _is_emulated(dev):
            return DeviceTensor(func(data, **{**kwargs, "device": _HOST}))
        if _is_dev(src):
            HOST_READS[0] += 1
        return func(data, **kwargs)  # to the host (or another real device)

    @staticmethod
    def _check_same_device(func, args, flat) -> None:
        if func in _INDEXING:
            base = args[0]
            if _is_dev(base):
                return  # host indices into a device tensor: allowed, as on CUDA
            raise DeviceMismatch(f"indices should be either on cpu or on the same device as the indexed tensor "
                                 f"(cpu) [{func}: a host tensor indexed by {NAME} indices]")
        host = [x for x in flat if isinstance(x, torch.Tensor) and not _is_dev(x) and x.dim() > 0]
        if host:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"{NAME}:0 and cpu! [{func}: a host tensor of shape {tuple(host[0].shape)} with "
                                 f"device tensors]")


_FROM_DATA = {"tensor", "as_tensor", "asarray", "new_tensor"}


class _FactoryMode(torch.overrides.TorchFunctionMode):
    """``torch.tensor(data, device=<emulated>)`` and its kin build their data with the dispatch modes off, so
    they would reach the (kernel-less) PrivateUse1 backend: they are built on the host and then moved."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("tensor", "as_tensor") and args and isinstance(args[0], (list, tuple)):
            # a list of device scalars: read on the host (a synchronizing copy, as on CUDA)
            args = (tree_map(lambda x: x.data_ if _is_dev(x) else x, args[0]), *args[1:])
        if name in _FROM_DATA and _is_emulated(kwargs.get("device")):
            rg = kwargs.get("requires_grad", False)
            host = {**kwargs, "device": _HOST}
            if name != "as_tensor":  # as_tensor takes no requires_grad
                host["requires_grad"] = False
            out = func(*args, **host)
            out = out.to(device())
            return out.requires_grad_(True) if rg else out
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# the rules for this package's own calls: collectives, files
# --------------------------------------------------------------------------------------------------
def _ours(depth: int = 2) -> str | None:
    """The module of the caller ``depth`` frames up when it is this package's (not the platform's)."""
    f = sys._getframe(depth)
    name = f.f_globals.get("__name__", "")
    if name.startswith("nemo_minitron.") and not name.startswith("nemo_minitron.platform"):
        return f"{name}:{f.f_lineno}"
    return None


_GLOO_GROUPS: set = set()  # groups created with an explicit backend="gloo" (megatron's *_gloo groups)


def _nccl_like(group) -> bool:
    import torch.distributed as dist

    g = group if group is not None else dist.group.WORLD
    return g not in _GLOO_GROUPS


def _tensors(obj):
    flat, _ = tree_flatten(obj)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def _check_collective(name: str, where: str, tensors, group) -> None:
    if not _nccl_like(group):
        return
    host = [t for t in tensors if not _is_dev(t)]
    if host:
        raise DeviceMismatch(f"{name} at {where}: NCCL refuses a host tensor (shape {tuple(host[0].shape)}, "
                             f"{host[0].dtype}): Tensors must be CUDA and dense; keep collectives on the model's "
                             "device")


def _patch_distributed() -> None:
    import torch.distributed as dist

    # gloo carries the device's collectives (on the CPU data): process groups map the device type to it
    dist.Backend.backend_capability.setdefault("gloo", ["cpu"]).append(NAME)
    dist.Backend.default_device_backend_map.setdefault(NAME, "gloo")

    def checked(fn, name, tensor_args):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            where = _ours()
            if where is not None:
                bound = list(args[:len(tensor_args)]) + [kwargs.get(k) for k in tensor_args[len(args):]]
                _check_collective(name, where, _tensors(bound), kwargs.get("group"))
            return fn(*args, **kwargs)
        return wrapper

    specs = {"all_reduce": ("tensor",), "broadcast": ("tensor",), "reduce": ("tensor",),
             "all_gather": ("tensor_list", "tensor"), "all_gather_into_tensor": ("output_tensor", "input_tensor"),
             "reduce_scatter_tensor": ("output", "input"), "reduce_scatter": ("output", "input_list"),
             "all_to_all_single": ("output", "input"), "all_to_all": ("output_tensor_list", "input_tensor_list"),
             "gather": ("tensor", "gather_list"), "scatter": ("tensor", "scatter_list")}
    # (point-to-point ops are left alone: P2POp checks its op by identity, and only megatron's pipeline
    # schedules send tensors)
    for name, targs in specs.items():
        setattr(dist, name, checked(getattr(dist, name), name, targs))

    for name in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
        fn = getattr(dist, name)

        def obj_wrapper(*args, _fn=fn, _name=name, **kwargs):
            where = _ours()
            if where is not None:
                devs = [t for t in _tensors((args, kwargs)) if _is_dev(t)]
                if devs:
                    raise DeviceMismatch(f"{_name} at {where}: holds a {NAME} tensor (shape {tuple(devs[0].shape)}); "
                                         "with NCCL it arrives on the sender's GPU: send host copies, or use a "
                                         "tensor collective")
            return _fn(*args, **kwargs)
        setattr(dist, name, functools.wraps(fn)(obj_wrapper))

    new_group = dist.new_group

    @functools.wraps(new_group)
    def new_group_recording(*args, **kwargs):
        g = new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if backend is not None and str(backend).lower() == "gloo":
            _GLOO_GROUPS.add(g)
        return g

    dist.new_group = new_group_recording
    # object collectives over an NCCL group serialize through the current GPU, not the host
    from torch.distributed import distributed_c10d as c10d

    orig_coll_device = c10d._get_object_coll_device

    def _get_object_coll_device(group=None):
        return str(device()) if _nccl_like(group) else orig_coll_device(group)

    c10d._get_object_coll_device = _get_object_coll_device


def _patch_files() -> None:
    orig_load = torch.load

    @functools.wraps(orig_load)
    def load(f, map_location=None, *args, **kwargs):
        where = _ours()
        if where is not None and map_location is None:
            raise DeviceMismatch(f"torch.load at {where} without map_location: a file written from a GPU loads "
                                 "onto that GPU (on every rank, or fails without one); say where its tensors go")
        return orig_load(f, map_location, *args, **kwargs)

    torch.load = load


def lightning_accelerator():
    """Lightning's accelerator for the emulated GPU: the trainer (NeMo's strategy included) then treats the
    run as a GPU run, moving the model and every batch to the device, as on CUDA."""
    from lightning.pytorch.accelerators import Accelerator

    class EmulatedGPUAccelerator(Accelerator):
        def setup_device(self, device):
            pass

        def teardown(self):
            pass

        def get_device_stats(self, device):
            return {}

        @staticmethod
        def parse_devices(devices):
            return int(devices) if devices not in (None, "auto", -1) else 1

        @staticmethod
        def get_parallel_devices(devices):
            n = devices if isinstance(devices, int) else len(devices)
            return [device()] * n

        @staticmethod
        def auto_device_count():
            return 1

        @staticmethod
        def is_available():
            return True

    return EmulatedGPUAccelerator()


def activate() -> bool:
    """Register the emulated device and its rules (once per process). True when active."""
    if _ACTIVE[0]:
        return True
    if not requested():
        return False
    import torch.utils.backend_registration as br

    br._setup_privateuseone_for_python_backend(rename=NAME)
    _Mode().__enter__()  # both stay pushed for the life of the process
    _FactoryMode().__enter__()
    _patch_distributed()
    _patch_files()
    _ACTIVE[0] = True
    return True
