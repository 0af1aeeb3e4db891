"""The names of theta's tensors, in one place.

Theta is one flat ``dict[str, Tensor]`` (see ``maml``) that says by itself what it holds, so a
checkpoint needs no config to be evaluated, adapted or served. That only works if every reader
spells the names the same way; these helpers are the one spelling:

* ``conv{i}.weight``, ``bn{i}.weight`` (scale, absent with ``bn_scale: false``), ``bn{i}.bias``
  (shift), ``head.weight``, ``head.bias``: the network's weights (``model.init_params``);
* a BN tensor with a step axis ([S, C]) is per-step BN (MAML++) or, with one row, BN that is
  meta-learned but not adapted (``adapt_bn: false``): ``is_step_bn``;
* ``lr.<name>``: the learned per-step inner lrs of weight ``<name>`` (MAML++'s LSLR).

Example::

    theta[lr_key("conv0.weight")]        # the inner lrs of conv0, one per step
    network_weights(theta)               # what the network's forward reads
"""

from __future__ import annotations

from torch import Tensor

Params = dict[str, Tensor]

LR_PREFIX = "lr."
_BN_PREFIX = "bn"


def lr_key(name: str) -> str:
    """The key of the learned inner lrs of weight ``name``."""
    return LR_PREFIX + name


def is_lr_key(key: str) -> bool:
    """Does ``key`` hold learned inner lrs (not a network weight)?"""
    return key.startswith(LR_PREFIX)


def lr_target(key: str) -> str:
    """The weight whose inner lrs ``key`` holds: ``lr.conv0.weight`` -> ``conv0.weight``."""
    return key[len(LR_PREFIX) :]


def network_weights(params: Params) -> Params:
    """The network's own tensors of ``params`` (learned lrs left out), in theta's order."""
    return {k: v for k, v in params.items() if not is_lr_key(k)}


def learned_lrs(params: Params) -> Params:
    """The learned inner lrs of ``params`` (empty without LSLR), keyed ``lr.<name>``."""
    return {k: v for k, v in params.items() if is_lr_key(k)}


def conv_key(i: int) -> str:
    """Block ``i``'s conv weight."""
    return f"conv{i}.weight"


def bn_scale_key(i: int) -> str:
    """Block ``i``'s BatchNorm scale (absent from theta with ``bn_scale: false``)."""
    return f"bn{i}.weight"


def bn_shift_key(i: int) -> str:
    """Block ``i``'s BatchNorm shift."""
    return f"bn{i}.bias"


def is_step_bn(key: str, tensor: Tensor) -> bool:
    """A BN scale or shift with a step axis ([S, C]): per-step BN, or with one row BN that the
    inner loop leaves alone. Either way meta-learned only, never adapted."""
    return key.startswith(_BN_PREFIX) and tensor.dim() == 2


def adapted_names(params: Params) -> list[str]:
    """Names the inner loop updates: every network weight except BN weights with a step axis.

    Per-step BN weights are meta-learned only (as in MAML++): adapting a table indexed by step
    in a loop that uses one row per step would be a no-op for all rows but one. A single row
    (``adapt_bn: false``) is the reference code's BatchNorm, whose offsets the inner loop
    leaves alone.
    """
    return [k for k, v in params.items() if not is_lr_key(k) and not is_step_bn(k, v)]
