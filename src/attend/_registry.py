"""Registry of flash-attention implementations (no torch import).

Same contract as ``torch.nn.attention._registry``: an implementation is a name plus a
``register_fn`` that installs it when activated and may return a handle with ``.remove()``.
In attend, a ``register_fn`` installs a kernel object into the FLASH backend's slot with
:func:`install_flash_kernel`, which returns such a handle. The kernel object has
``check(params) -> list[str]`` (reasons it cannot run a call; empty = it can) and
``forward(...)``; see ``attend.backends.flash`` for the call it receives. A kernel whose ``check``
reads nothing beyond what the dispatcher's decision cache keys on (``attend._dispatch.signature``)
may set ``cacheable_check = True``; any other kernel's ``check`` runs on every call. One that
also reads the key length only as ``S == L`` and K / V's strides not at all may set
``key_length_class = True``: a decode loop's growing keys then keep its decision
(``attend._dispatch``, Note [key length class]).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

__all__ = [
    "register_flash_attention_impl",
    "activate_flash_attention_impl",
    "list_flash_attention_impls",
    "current_flash_attention_impl",
    "restore_flash_attention_impl",
    "install_flash_kernel",
    "active_flash_kernel",
    "flash_kernel_version",
]


class _Handle(Protocol):
    def remove(self) -> None: ...


_RegisterFn = Callable[[], "_Handle | None"]

_impls: dict[str, _RegisterFn] = {}
_active: str | None = None
_handles: dict[str, _Handle] = {}
_kernel: Any = None  # the kernel object installed by the active register_fn, if any
_kernel_version = 0  # bumped whenever _kernel changes: the dispatcher's decision cache keys on it


def register_flash_attention_impl(impl: str, *, register_fn: _RegisterFn) -> None:
    """Register ``register_fn`` under the name ``impl``; activation calls it.

    Registering never activates. Registering a name again replaces its ``register_fn``.
    """
    if not isinstance(impl, str) or not impl:
        raise TypeError(f"impl must be a non-empty str, got {impl!r}")
    if not callable(register_fn):
        raise TypeError(f"register_fn must be callable, got {type(register_fn).__name__}")
    _impls[impl] = register_fn


def activate_flash_attention_impl(impl: str) -> None:
    """Make ``impl`` the FLASH backend's implementation.

    The previous implementation is restored first. Unknown names raise ``ValueError``
    listing the known ones; a ``register_fn`` that fails (missing package or GPU) leaves
    the default implementation active and its error propagates.
    """
    global _active
    restore_flash_attention_impl()
    register_fn = _impls.get(impl)
    if register_fn is None:
        raise ValueError(
            f"unknown flash attention implementation {impl!r}; "
            f"registered: {list_flash_attention_impls()}"
        )
    handle = register_fn()
    if handle is not None:
        _handles[impl] = handle
    _active = impl


def list_flash_attention_impls() -> list[str]:
    """Names of the registered implementations, in registration order."""
    return list(_impls)


def current_flash_attention_impl() -> str | None:
    """The active implementation's name; ``None`` means attend's own Triton kernel."""
    return _active


def restore_flash_attention_impl() -> None:
    """Deactivate the current implementation (calling its handle's ``remove()``)."""
    global _active
    if _active is not None:
        handle = _handles.pop(_active, None)
        if handle is not None:
            handle.remove()
    _active = None


class _KernelHandle:
    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    def remove(self) -> None:
        global _kernel, _kernel_version
        if _kernel is self._kernel:
            _kernel = None
            _kernel_version += 1


def install_flash_kernel(kernel: Any) -> _Handle:
    """Install ``kernel`` as the FLASH backend's implementation; for ``register_fn``s."""
    global _kernel, _kernel_version
    for attr in ("check", "forward"):
        if not callable(getattr(kernel, attr, None)):
            raise TypeError(f"a flash kernel needs a callable .{attr}; {kernel!r} has none")
    _kernel = kernel
    _kernel_version += 1
    return _KernelHandle(kernel)


def active_flash_kernel() -> Any:
    """The installed kernel object, or ``None`` for attend's default."""
    return _kernel


def flash_kernel_version() -> int:
    """A number that changes whenever the installed kernel does (install or remove)."""
    return _kernel_version
