"""The native CPU kernels of packed layers: built on first use, else pure torch.

``kernels.c`` is compiled once per machine with the system C compiler
(``gcc -O3 -march=native -fopenmp``; about a second) into a cache folder and
called through ``ctypes``, so installing lwq stays one ``pip install`` with no
build step and no torch headers. The library is keyed by the source's hash and
the CPU's flags, so a cache folder shared between machines never hands one
machine another's instructions. Where no compiler is found or the build fails,
packed layers compute with the pure-torch path of ``lwq.runtime.layout`` and
one warning says so.

Settings (environment):

- ``LWQ_KERNELS``: ``auto`` (default: native if it builds), ``native`` (an
  error if it does not), ``torch`` (never build);
- ``LWQ_KERNEL_CACHE``: where built libraries go (default
  ``~/.cache/lwq/kernels``);
- ``CC``: the compiler (default ``gcc``, else ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lwq.errors import ConfigError
from lwq.runtime.layout import BLOCK, Layout

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
MODES = ("auto", "native", "torch")
MAX_ROWS = 8  # activation rows per call of the matrix-vector kernel (MAXM in kernels.c)
MAX_LAYERS = 8  # layers in one matrix-vector call (MAX_LAYERS in kernels.c)
ABI_VERSION = 3
ACTIVATIONS = ("silu", "gelu_tanh")  # the gated MLP's activations, in kernels.c's order


class _LayerT(ctypes.Structure):
    pass


_LayerT._fields_ = [
    ("n_out", ctypes.c_int64),
    ("n_in", ctypes.c_int64),
    ("bits", ctypes.c_int64),
    ("group", ctypes.c_int64),
    ("n_groups", ctypes.c_int64),
    ("n_blocks", ctypes.c_int64),
    ("last_blocks", ctypes.c_int64),
    ("codes", ctypes.c_void_p),
    ("scales", ctypes.c_void_p),
    ("zeros", ctypes.c_void_p),
    ("rowptr", ctypes.c_void_p),
    ("hi_counts", ctypes.c_void_p),
    ("hi_entries", ctypes.c_void_p),
    ("hi_scales", ctypes.c_void_p),
    ("hi_values", ctypes.c_void_p),
    ("hi_cols", ctypes.c_void_p),
    ("hi_codes", ctypes.c_void_p),
    ("hi_group", ctypes.c_int64),
    ("hi_n_groups", ctypes.c_int64),
    ("hi_code_bits", ctypes.c_int64),
    ("hi_wide", ctypes.c_int64),
    ("hi_grid", ctypes.POINTER(_LayerT)),
]


def kernel_mode() -> str:
    mode = os.environ.get("LWQ_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"LWQ_KERNELS={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.system()}-{platform.machine()}-{flags}"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return cc
    return None


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LWQ_KERNEL_CACHE", Path.home() / ".cache" / "lwq" / "kernels"))
    return cache.expanduser() / f"lwq_kernels-{digest}.so"


def build(target: Path) -> None:
    """Compile ``kernels.c`` into ``target`` (atomically: a failed build leaves nothing)."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-lm", "-o"]
        done = subprocess.run([*cmd, str(out)], capture_output=True, text=True)
        if done.returncode != 0 and "march" in done.stderr:  # a compiler without -march=native
            cmd.remove("-march=native")
            done = subprocess.run([*cmd, str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)


class Kernels:
    """The loaded library."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        if lib.lwq_abi_version() != ABI_VERSION:
            raise OSError(f"{path}: kernel ABI {lib.lwq_abi_version()}, expected {ABI_VERSION}")
        ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.lwq_matvec.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, i64, cint]
        lib.lwq_matvec.restype = cint
        lib.lwq_mlp.argtypes = [ptr, cint, ptr, i64, i64, ptr, ptr, i64, cint]
        lib.lwq_mlp.restype = cint
        lib.lwq_dequantize.argtypes = [ptr, ptr, i64, cint]
        lib.lwq_dequantize.restype = None
        lib.lwq_half_matvec.argtypes = [ptr, i64, i64, cint, ptr, i64, i64, ptr, ptr, i64, cint]
        lib.lwq_half_matvec.restype = None
        self.lib = lib
        self.path = path

    @staticmethod
    def describe(L: Layout) -> _LayerT:
        """The C view of a CPU layout; it borrows the tensors' memory."""

        def addr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            assert t.device.type == "cpu" and t.is_contiguous()
            return t.data_ptr()

        hi = L.hi_grid()
        c = _LayerT(
            L.n_out,
            L.n_in,
            L.bits,
            L.group,
            L.n_groups,
            L.n_blocks,
            L.last_blocks,
            addr(L.codes),
            addr(L.scales),
            addr(L.zeros),
            addr(L.rowptr),
            addr(L.hi_counts),
            addr(L.hi_entries),
            addr(L.hi_scales),
            addr(L.hi_values),
            addr(L.hi_cols),
            addr(L.hi_codes),
            L.hi_group,
            next((t.shape[1] for t in (L.hi_counts, L.hi_scales) if t is not None), 0),
            L.hi_code_bits,
            int(L.hi_entries is not None and L.hi_entries.dtype == torch.int32),
        )
        if hi is not None:
            c.hi_grid = ctypes.pointer(Kernels.describe(hi))  # kept alive by c
        return c

    def dequantize(self, c_layer: _LayerT, L: Layout) -> torch.Tensor:
        """The (n_out, n_in) float32 weight."""
        w = torch.empty(L.n_out, L.n_in, dtype=torch.float32)
        self.lib.lwq_dequantize(
            ctypes.byref(c_layer), w.data_ptr(), L.n_in, torch.get_num_threads()
        )
        hi = L.hi_grid()
        if hi is not None:  # zero where the low grid holds the weight: the sum is exact
            w.add_(self.dequantize(c_layer.hi_grid.contents, hi))
        return w

    def bind_matvec(
        self,
        c_layers: Sequence[_LayerT],
        layouts: Sequence[Layout],
        biases: Sequence[torch.Tensor | None],
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The matrix-vector call of layers that read the same input, with
        everything but the activations bound.

        ``call(x)``: x (..., n_in) float32, contiguous, at most MAX_ROWS rows; the
        result is a new (..., sum of n_out) float32 tensor, the layers' outputs
        side by side. Decoding makes this call once per layer (or group of
        layers) and token, so the Python in it is kept short. ``c_layers`` and
        ``biases`` must outlive it; the layouts must share n_in and padding."""
        first = layouts[0]
        assert 1 <= len(layouts) <= MAX_LAYERS and all(L.reads == first.reads for L in layouts)
        n_out = sum(L.n_out for L in layouts)
        return self._bind(self.lib.lwq_matvec, len(layouts), c_layers, biases, first, n_out)

    def bind_mlp(
        self,
        c_layers: Sequence[_LayerT],
        layouts: Sequence[Layout],
        biases: Sequence[torch.Tensor | None],
        act: str,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A gated MLP's call, down(act(gate(x)) * up(x)), for its three layers in
        that order (``act`` one of ACTIVATIONS); as ``bind_matvec`` otherwise.
        gate and up share their input layout; down's input is unpadded."""
        gate, up, down = layouts
        assert gate.reads == up.reads and gate.n_out == up.n_out == down.n_in
        assert down.row_blocks * BLOCK == down.n_in
        code = ACTIVATIONS.index(act)
        return self._bind(self.lib.lwq_mlp, code, c_layers, biases, gate, down.n_out)

    @staticmethod
    def _bind(
        fn: Any,
        what: int,
        c_layers: Sequence[_LayerT],
        biases: Sequence[torch.Tensor | None],
        first: Layout,
        n_out: int,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn(layers, what, x, m, ldx, biases, y, ldy, threads)`` with all but
        the activations bound (``what``: lwq_matvec's layer count, lwq_mlp's
        activation)."""
        n_in = first.n_in
        addrs = (ctypes.c_void_p * len(c_layers))(*(ctypes.addressof(c) for c in c_layers))
        bias_ptrs = (ctypes.c_void_p * len(biases))(
            *(None if b is None else b.data_ptr() for b in biases)
        )
        pad = None if first.row_blocks * BLOCK == n_in else first.pad_input

        def call(x: torch.Tensor) -> torch.Tensor:
            m = x.numel() // n_in
            y = torch.empty((*x.shape[:-1], n_out))
            if pad is not None:
                x = pad(x.reshape(m, n_in))
            ldx = x.shape[-1] if pad is not None else n_in
            threads = torch.get_num_threads()
            if fn(addrs, what, x.data_ptr(), m, ldx, bias_ptrs, y.data_ptr(), n_out, threads):
                raise MemoryError("lwq: a native kernel found no memory for its scratch sums")
            return y

        return call

    def half_matvec(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x (m, n_in) float32 times a float16 or bfloat16 w (n_out, n_in), m <= MAX_ROWS."""
        assert w.dtype in (torch.float16, torch.bfloat16) and w.is_contiguous()
        x = x.contiguous()
        m, (n_out, n_in) = x.shape[0], w.shape
        y = torch.empty(m, n_out, dtype=torch.float32)
        self.lib.lwq_half_matvec(
            w.data_ptr(),
            n_out,
            n_in,
            int(w.dtype == torch.bfloat16),
            x.data_ptr(),
            m,
            x.shape[1],
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            n_out,
            torch.get_num_threads(),
        )
        return y


_lock = threading.Lock()
_loaded: Kernels | None = None
_failed: str | None = None
_loaded_for: str | None = None  # the LWQ_KERNELS value _loaded was last handed out under


def kernels() -> Kernels | None:
    """The native kernels, building them on first use; None means the torch path.

    Packed layers ask once per call: while ``LWQ_KERNELS`` keeps the value it had
    when they were last handed out, the answer is one environment look-up."""
    global _loaded, _failed, _loaded_for
    setting = os.environ.get("LWQ_KERNELS")
    if _loaded is not None and setting == _loaded_for:
        return _loaded
    mode = kernel_mode()
    if mode == "torch":
        return None
    if _loaded is not None:
        _loaded_for = setting
        return _loaded
    with _lock:
        if _loaded is not None or (_failed is not None and mode == "auto"):
            return _loaded
        path = library_path()
        try:
            if not path.is_file():
                log.info("building lwq's native kernels into %s", path)
                build(path)
            _loaded = Kernels(path)
            _loaded_for = setting
        except OSError as err:
            _failed = str(err)
            if mode == "native":
                raise ConfigError(
                    f"LWQ_KERNELS=native but the native kernels did not build: {err}"
                ) from err
            warnings.warn(
                f"lwq: packed layers use the pure-torch path (slower): the native kernels "
                f"did not build ({err}). Install gcc, or set LWQ_KERNELS=torch to skip them.",
                RuntimeWarning,
                stacklevel=2,
            )
        return _loaded


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc only; else nothing).

    Loading rearranges every layer through temporaries; without this the process
    keeps their peak as resident memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
