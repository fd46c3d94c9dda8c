"""Backend selection: one loop over the priority order, shared by dispatch, ``explain``,
``can_use_*(debug=True)``, the unfused-kernel warnings and the no-kernel error."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import torch

from . import _state
from ._enums import SDPBackend
from ._params import SDPAParams, from_params, prepare
from ._versions import assume_constant_result
from . import _registry
from .backends import BACKENDS, _base, default_priority, kernel_for, kernel_notes, registry_version
from .bias import CausalBias

DISABLED = "disabled by sdpa_kernel"


@assume_constant_result
def _traced_state() -> _state.BackendState:
    # Dynamo cannot read a ContextVar; under torch.compile the state is read once at trace
    # time, like the rest of the backend choice.
    return _state.current_state()


def _current_state() -> _state.BackendState:
    return _traced_state() if torch.compiler.is_compiling() else _state.current_state()


@dataclass
class Decision:
    """The outcome of backend selection for one call; ``str()`` gives a readable table."""

    backend: SDPBackend
    order: list[SDPBackend]
    reasons: dict[SDPBackend, list[str]] = field(default_factory=dict)
    call: str = ""
    notes: list[str] = field(default_factory=list)  # which of attend's kernels the chosen backend runs

    def __str__(self) -> str:
        lines = [f"attend would run: {self.backend.name}" if self.backend is not SDPBackend.ERROR
                 else "attend would run: nothing (no enabled backend can take this call)"]
        if self.call:
            lines.append(f"call: {self.call}")
        lines.append("")
        width = max(len(b.name) for b in self.order)
        lines.append(f"{'priority':>8}  {'backend':<{width}}  status")
        for i, b in enumerate(self.order, 1):
            if b is self.backend:
                status = "SELECTED"
            else:
                rs = self.reasons.get(b, [])
                status = "skipped: " + "; ".join(rs) if rs else "usable, but lower priority"
            lines.append(f"{i:>8}  {b.name:<{width}}  {status}")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _describe(p: SDPAParams) -> str:
    q, k, v = p.query, p.key, p.value
    mask = p.attn_mask
    mask_s = "none" if mask is None else (repr(mask) if not isinstance(mask, torch.Tensor)
                                          else f"{str(mask.dtype).removeprefix('torch.')} {tuple(mask.shape)}")
    return (f"query {tuple(q.shape)} key {tuple(k.shape)} value {tuple(v.shape)} "
            f"{str(q.dtype).removeprefix('torch.')} on {q.device}; mask {mask_s}; is_causal={p.is_causal}; "
            f"dropout_p={p.dropout}; enable_gqa={p.enable_gqa}")


def decide(p: SDPAParams, *, exhaustive: bool = False) -> Decision:
    """Pick the first enabled backend whose check passes; with ``exhaustive`` check them all."""
    state = _current_state()
    order = _state.order_backends(state, default_priority(p.query.device))
    chosen, reasons = SDPBackend.ERROR, {}
    for b in order:
        if chosen is not SDPBackend.ERROR and not exhaustive:
            break
        rs = [DISABLED] if b not in state.enabled else BACKENDS[b].check(p)
        if rs:
            reasons[b] = rs
        elif chosen is SDPBackend.ERROR:
            chosen = b
    return Decision(chosen, order, reasons)


# Note [decision cache]: a decode step calls attention once per layer with the same shapes, and
# asking every backend's check again costs host time the GPU waits for (the cuDNN check builds
# PyTorch's SDPAParams and runs its C++ predicate). The choice is a function of ``signature``, so
# the successful ones are kept per signature: only for checks that read nothing more
# (``cacheable_check``), never under torch.compile (the choice is made once at trace time there),
# and never for ``explain``, ``can_use_*`` or the unfused-kernel warnings, which want the reasons.
# The table is emptied when full.
DECISION_CACHE_SIZE = 256
_decisions: dict[tuple, SDPBackend] = {}

# Note [key length class]: a decode step's keys are one longer than the last step's, and a KV
# cache grown by ``torch.cat`` (transformers' DynamicCache) has strides that grow with them, so an
# exact signature is new at every step and every backend's check runs again. Where the call has
# no mask and 4-D K / V of one length S >= 2, the signature holds instead what the checks read of
# S and of K / V's strides:
# - S == 0 and S == 1 (PyTorch's nonzero-length and cuDNN's ``s_k != 1`` checks): such calls key
#   exactly;
# - S == L (FA2's and FA4's causal alignment, PyTorch's ``check_flash_causal_non_square_seqlens``);
# - S % 64 == 0 (cuDNN before 8.9.6);
# - each stride, as its value or, where it is a multiple m of S times the length dim's stride, as
#   m: the strides are then a function of the class and S, and a stride's comparison with a
#   product of S (cuDNN's layout predicates) is one of the class (a static cache's slice whose
#   length divides the buffer's strides is a class of its own);
# - cuDNN's four K / V layout predicates (``check_cudnn_layout``: packed and unpacked), as computed.
# Those are every read of S and of K / V's strides in the dense checks of PyTorch 2.11-2.15
# (``sdp_utils.cpp``) and of attend's own; while a check that may read more is installed (a user's
# OVERRIDEABLE check, a flash kernel without ``key_length_class``), every call keys exactly
# (``_reads_length_class``). ``tests/test_backends_gpu.py`` compares the cached choice with a fresh
# ``decide`` over every length up to 600 in four K / V layouts under the installed PyTorch's checks.
_CLASSED = "key length class"


def _strides_of_length(st: tuple[int, ...], S: int) -> tuple:
    """A 4-D tensor's strides, each that is a multiple m of S times the length dim's as ("S", m)."""
    a, b, c, d = st
    u = S * c
    if not u:
        return st
    return (("S", a // u) if a and not a % u else a, ("S", b // u) if b and not b % u else b, c,
            ("S", d // u) if d and not d % u else d)


def _length_class(p: SDPAParams) -> tuple | None:
    """K and V's shapes and strides up to the key length's class (Note [key length class]), or None
    where the call keys on them exactly."""
    if p.attn_mask is not None:
        return None
    ks, vs, qs = p.key.shape, p.value.shape, p.query.shape
    if len(ks) != 4 or len(vs) != 4 or len(qs) != 4:
        return None
    S = ks[2]
    if S < 2 or vs[2] != S:
        return None
    kst, vst = p.key.stride(), p.value.stride()
    d = qs[3]
    hd = qs[1] * d
    unpacked, packed = (S * hd, d, hd, 1), (3 * S * hd, d, 3 * hd, 1)
    return (_CLASSED, ks[0], ks[1], ks[3], vs[0], vs[1], vs[3], _strides_of_length(kst, S),
            _strides_of_length(vst, S), S == qs[2], S % 64 == 0,
            kst == unpacked, kst == packed, vst == unpacked, vst == packed)


def signature(p: SDPAParams, state: _state.BackendState) -> tuple | None:
    """What the backends' checks read of the call ``p`` and of the process, as a dict key.

    Of the call: the device and dtype, each tensor's shape, strides and ``requires_grad`` (K and
    V's up to the key length's class where the checks allow, Note [key length class]), the mask's kind
    (a tensor's dtype, shape, strides and ``requires_grad``; a causal bias's variant), dropout,
    ``is_causal`` and ``enable_gqa``. Of the process: the ``sdpa_kernel`` state, grad mode,
    deterministic mode, which of attend's kernels serves the device and dtype (Triton's
    interpreter), the installed flash kernel and OVERRIDEABLE implementations, PyTorch's cuDNN and
    flash SDPA flags and the current CUDA device (PyTorch's checks read its properties). None for
    tensors other than plain ``torch.Tensor`` (subclasses and fake tensors answer as they choose).
    """
    q, k, v, m = p.query, p.key, p.value, p.attn_mask
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    if m is None:
        mask = None
    elif type(m) is torch.Tensor:
        mask = (m.dtype, m.shape, m.stride(), m.requires_grad)
    elif isinstance(m, CausalBias):
        mask = m.variant
    else:
        return None
    device, flash_version, overrideable_version = q.device, _registry.flash_kernel_version(), registry_version()
    kv = _length_class(p)
    if kv is not None and not _reads_length_class(p, (flash_version, overrideable_version, device.type)):
        kv = None
    if kv is None:
        kv = (k.shape, k.stride(), v.shape, v.stride())
    return (device, q.dtype, q.shape, q.stride(), q.requires_grad, kv, k.requires_grad, v.requires_grad,
            mask, p.dropout, p.is_causal, p.enable_gqa,
            state, torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), kernel_for(q), flash_version, overrideable_version,
            torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.cuda.current_device() if device.type == "cuda" else None)


def _classed(key: tuple) -> bool:
    return key[5][0] == _CLASSED


_READS_CLASS: dict[tuple, bool] = {}


def _reads_length_class(p: SDPAParams, registries: tuple) -> bool:
    """Whether every backend's check reads the key length and K / V's strides only through their
    class (Note [key length class]): not an installed flash kernel without ``key_length_class``, nor
    a registered OVERRIDEABLE check, which may read anything. Each backend's answer depends only on
    the registries and the device type (``registries``: both versions and ``p``'s device type), so
    it is asked once per such state."""
    hit = _READS_CLASS.get(registries)
    if hit is None:
        hit = all(getattr(b, "key_length_class", lambda p: False)(p) for b in BACKENDS.values())
        if len(_READS_CLASS) > 64:
            _READS_CLASS.clear()
        _READS_CLASS[registries] = hit
    return hit


def _cacheable(d: Decision, p: SDPAParams) -> bool:
    """Whether every check that ``decide`` ran to reach ``d`` reads only the signature."""
    for b in d.order:
        cacheable = getattr(BACKENDS[b], "cacheable_check", None)  # absent: the check reads no more
        if d.reasons.get(b) != [DISABLED] and cacheable is not None and not cacheable(p):
            return False
        if b is d.backend:
            return True
    return False


def choose(p: SDPAParams, key: tuple | None = None) -> SDPBackend:
    """``decide(p).backend``, from the decision cache where the signature is there; raises the
    no-backend error (never cached) where no enabled backend can take the call. ``key``: ``p``'s
    signature where the caller has it."""
    held, epoch = _base.TORCH_FLAGS["HELD"], _base.TORCH_FLAGS["EPOCH"]
    if key is None and not torch.compiler.is_compiling():
        key = signature(p, _state.current_state())
    if key is not None:
        hit = _decisions.get(key)
        if hit is not None:
            return hit
    d = decide(p)
    if d.backend is SDPBackend.ERROR:
        lines = [f"  {b.name}: {'; '.join(rs)}" for b, rs in d.reasons.items() if rs != [DISABLED]]
        disabled = [b.name for b, rs in d.reasons.items() if rs == [DISABLED]]
        msg = "no enabled attention backend can run this call:\n" + "\n".join(lines)
        if disabled:
            msg += f"\n  (disabled by sdpa_kernel: {', '.join(disabled)})"
        raise RuntimeError(msg + f"\n  call: {_describe(p)}")
    # Not where another thread's run of one of PyTorch's kernels had its flags changed meanwhile:
    # the key and PyTorch's checks may then have read two states.
    if key is not None and held == 0 and epoch == _base.TORCH_FLAGS["EPOCH"] and _cacheable(d, p):
        if len(_decisions) >= DECISION_CACHE_SIZE:
            _decisions.clear()
        _decisions[key] = d.backend
    return d.backend


# Note [prepared calls]: validating a call (``prepare``) costs a decode step more host time than
# choosing its backend. A call whose arguments are already in the backends' form (4-D tensors that
# need no broadcast, a tensor mask in the query's dtype, float / bool flags, a finite float scale
# or None) validates the same way for the same signature plus the key's and value's dtypes and
# devices and the mask's device, so such a call whose backend choice was cached is kept here with
# its output shape, and later calls with its key skip ``prepare`` and ``choose``. Invalid calls
# raise in ``prepare`` before anything is kept; MATH calls are not kept (their warnings); nothing
# is kept under torch.compile.
_prepared: dict[tuple, tuple[SDPBackend, tuple[int, ...]]] = {}


def _prepared_key(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
                  ) -> tuple[tuple, SDPAParams] | None:
    """(the prepared-call key, the call's params as given) for a call the table may hold, else None."""
    if (type(dropout_p) is not float or type(is_causal) is not bool or type(enable_gqa) is not bool
            or (attn_mask is not None and (type(attn_mask) is not torch.Tensor or attn_mask.dim() != query.dim()))
            or (scale is not None and (type(scale) is not float or not math.isfinite(scale)))
            or torch.compiler.is_compiling()):
        return None
    p = SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    sig = signature(p, _state.current_state())
    if sig is None:
        return None
    return (sig, key.dtype, value.dtype, key.device, value.device,
            None if attn_mask is None else attn_mask.device), p


def _as_given(fast: tuple, call, scale: float | None) -> bool:
    """Whether ``prepare`` left ``fast``'s call as given (then both have one signature)."""
    raw, p = fast[1], call.params
    return (not call.zeros and call.scale == scale and p.query is raw.query and p.key is raw.key
            and p.value is raw.value and p.attn_mask is raw.attn_mask and p.dropout == raw.dropout
            and p.is_causal == raw.is_causal and p.enable_gqa == raw.enable_gqa)


def _keep_prepared(fast: tuple, call, backend: SDPBackend) -> None:
    """Keep ``fast``'s call (left as given by ``prepare``) if ``choose`` cached its backend."""
    if backend is SDPBackend.MATH or _decisions.get(fast[0][0]) is not backend:
        return
    if len(_prepared) >= DECISION_CACHE_SIZE:
        _prepared.clear()
    _prepared[fast[0]] = (backend, call.out_shape)


_warned: set[tuple] = set()


def _warn_unfused(d: Decision) -> None:
    key = tuple((b, tuple(rs)) for b, rs in d.reasons.items() if b in (
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION))
    if not key or key in _warned:
        return
    _warned.add(key)
    why = "; ".join(f"{b.name}: {', '.join(rs)}" for b, rs in key)
    warnings.warn(f"attend fell back to the unfused MATH backend because {why}", UserWarning, stacklevel=3)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention, run by the first enabled backend that can take the call.

    Same contract as ``torch.nn.functional.scaled_dot_product_attention``:

    Args:
        query: ``(..., Hq, L, E)``, at least 2-D.
        key: ``(..., Hk, S, E)``; its batch dims (all but the last two) broadcast against the
            query's, as in ``torch.matmul`` (a rank-3 key with a rank-4 query, for example).
        value: ``(..., Hv, S, Ev)``, broadcast the same way.
        attn_mask: bool (True = may attend) or additive float tensor (at least 2-D) that
            broadcasts to the scores ``(..., Hq, L, S)`` without growing them, or a causal bias
            (:class:`attend.bias.CausalBias` or PyTorch's ``torch.nn.attention.bias.CausalBias``).
        dropout_p: dropout probability on the attention weights, in ``[0, 1]``; 1 gives zeros.
        is_causal: top-left aligned causal mask (a bool); not together with ``attn_mask``.
        scale: softmax scale, a finite number or 0-d tensor; default ``1 / sqrt(E)``.
        enable_gqa: (a bool) let dim -3 of key and value hold fewer heads than the query's: query
            head ``h`` reads key head ``h // (Hq // Hk)`` and value head ``h // (Hq // Hv)``.

    Returns:
        ``(..., Hq, L, Ev)`` in the input dtype, the batch dims broadcast; 2-D inputs give
        ``(L, Ev)``. A row whose keys are all masked is 0. Head dim ``E = 0`` gives the
        (masked) mean of the values, as PyTorch does.

    Raises:
        ValueError / TypeError for invalid arguments (naming the argument, value and
        expectation); RuntimeError listing each enabled backend's reasons when none can run.

    Example::

        q = torch.randn(2, 8, 1024, 64)
        out = attend.scaled_dot_product_attention(q, q, q, is_causal=True)
    """
    fast = _prepared_key(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if fast is not None:
        hit = _prepared.get(fast[0])
        if hit is not None:  # Note [prepared calls]
            return BACKENDS[hit[0]].run(fast[1], scale).reshape(hit[1])
    call = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    p = call.params
    if call.zeros:
        return _zeros(p, call.out_shape)
    given = fast is not None and _as_given(fast, call, scale)
    backend = choose(p, fast[0][0] if given else None)  # the signature, computed once
    if backend is SDPBackend.MATH and not torch.compiler.is_compiling():
        if getattr(sys.modules["attend"], "WARN_FOR_UNFUSED_KERNELS", False):
            _warn_unfused(decide(p, exhaustive=True))
    if given:
        _keep_prepared(fast, call, backend)
    return BACKENDS[backend].run(p, call.scale).reshape(call.out_shape)


def _zeros(p: SDPAParams, shape: tuple[int, ...]) -> torch.Tensor:
    """PyTorch's result for a call with no query rows or an empty value: zeros, in the autograd
    graph of the inputs with zero gradients (``in_graph``)."""
    return in_graph(p.query.new_zeros(shape), (p.query, p.key, p.value, p.dense_mask))


def in_graph(out: torch.Tensor, inputs) -> torch.Tensor:
    """``out`` (computed without ``inputs``: zeros of an empty call) in the autograd graph of those
    of ``inputs`` (None allowed) that require grad, with zero gradients for them: ``where`` passes
    none to its unpicked branch, and never turns an inf or NaN input into a NaN output."""
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    if inputs and torch.is_grad_enabled():
        link = sum(t.sum() for t in inputs).to(out.dtype)
        out = torch.where(torch.zeros((), dtype=torch.bool, device=out.device), link, out)
    return out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> Decision:
    """Say which backend would run this call and why every other backend would not.

    Takes the arguments of :func:`scaled_dot_product_attention` (tensors may be on the
    ``meta`` device) and returns a :class:`Decision`: ``.backend`` is the chosen
    :class:`SDPBackend` (``ERROR`` if none), ``.reasons`` maps each skipped backend to its
    reasons, and ``str()`` prints the table.
    """
    call = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    p = call.params
    d = decide(p, exhaustive=True)
    d.call = _describe(p)
    if call.zeros:
        d.notes = [f"no query rows or an empty value: the result is zeros of shape {call.out_shape} "
                   "(as in PyTorch), and no backend runs"]
    elif d.backend is SDPBackend.EFFICIENT_ATTENTION or (
            d.backend is SDPBackend.FLASH_ATTENTION and _registry.current_flash_attention_impl() is None):
        d.notes = kernel_notes(p)
    return d


def _can_use(backend: SDPBackend, params: SDPAParams, debug: bool) -> bool:
    if not isinstance(params, (SDPAParams, torch.backends.cuda.SDPAParams)):
        raise TypeError(f"params must be an attend.SDPAParams or a torch.backends.cuda.SDPAParams, "
                        f"got {type(params).__name__}")
    try:
        reasons = BACKENDS[backend].check(from_params(params).params)
    except (TypeError, ValueError) as e:  # a call no backend may take
        reasons = [str(e)]
    if debug:
        for r in reasons:
            warnings.warn(f"{backend.name} cannot be used: {r}", UserWarning, stacklevel=3)
    return not reasons


def can_use_flash_attention(params: SDPAParams, debug: bool = False) -> bool:
    """Whether FLASH can run ``params``; with ``debug=True`` each failed condition is warned."""
    return _can_use(SDPBackend.FLASH_ATTENTION, params, debug)


def can_use_efficient_attention(params: SDPAParams, debug: bool = False) -> bool:
    """Whether EFFICIENT can run ``params``; with ``debug=True`` each failed condition is warned."""
    return _can_use(SDPBackend.EFFICIENT_ATTENTION, params, debug)


def can_use_cudnn_attention(params: SDPAParams, debug: bool = False) -> bool:
    """Whether CUDNN can run ``params``; with ``debug=True`` each failed condition is warned."""
    return _can_use(SDPBackend.CUDNN_ATTENTION, params, debug)


def enabled_backends(with_priority: bool = False, device_type: str | None = None) -> list[SDPBackend]:
    """The backends enabled here; with ``with_priority``, in the priority order for ``device_type``
    (default: ``"cuda"`` if available, else ``"cpu"``)."""
    state = _state.current_state()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    order = _state.order_backends(state, default_priority(device_type))
    if not with_priority:
        order = sorted(order)
    return [b for b in order if b in state.enabled]
