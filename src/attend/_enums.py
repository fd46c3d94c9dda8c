"""The backend enum. No torch import: the registry and state layers use it too."""

from enum import IntEnum


class SDPBackend(IntEnum):
    """Backends of scaled dot-product attention, numbered as in ``torch.nn.attention``.

    - ``ERROR``: no backend could be determined.
    - ``MATH``: the reference; materializes the ``L x S`` scores, any dtype.
    - ``FLASH_ATTENTION``: the active flash implementation (default: attend's Triton core).
    - ``EFFICIENT_ATTENTION``: attend's fused path that also takes masks and biases.
    - ``CUDNN_ATTENTION``: PyTorch's cuDNN attention ops.
    - ``OVERRIDEABLE``: implementations registered by users or device vendors.
    """

    ERROR = -1
    MATH = 0
    FLASH_ATTENTION = 1
    EFFICIENT_ATTENTION = 2
    CUDNN_ATTENTION = 3
    OVERRIDEABLE = 4


# Every backend that can run, in enum order.
ALL_BACKENDS: tuple[SDPBackend, ...] = tuple(b for b in SDPBackend if b is not SDPBackend.ERROR)
