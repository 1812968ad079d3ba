"""Tensors computed from parameters alone (layer scales, gates, tokens), followed axis by axis.

A parameter rarely meets the channels it scales directly: ``gamma.reshape(1, -1, 1, 1)``,
``sigmoid(gate)``, ``scale.to(x.dtype)`` or ``token.expand(B, -1, -1)`` come first. The
tracer describes every such tensor by a :class:`FromParameters`: for each of its axes, the
parameter axes that run along it. Where it meets channels, those parameter axes join the
channels' space. The operations here return a problem (a non-empty string) where they
cannot follow an axis; the tracer then freezes what is involved, it never drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphmerge.graphs.shapes import reshaped_axis

ParameterAxis = tuple[str, int]  # (state_dict name, axis of that tensor)


@dataclass(frozen=True)
class FromParameters:
    """A tensor whose channel structure comes from parameters and buffers alone.

    ``axes[k]`` holds the (parameter, parameter axis) pairs that tensor axis ``k`` runs
    along (axes of size 1 carry none). ``constant`` is non-empty, the reason, when some of
    its values move with no parameter (a tensor created in ``forward``, an operation the
    tracer cannot follow): broadcast along channels, such a tensor freezes them.
    """

    shape: tuple[int, ...]
    axes: tuple[frozenset[ParameterAxis], ...]
    constant: str = ""

    @classmethod
    def of(cls, name: str, shape: tuple[int, ...]) -> FromParameters:
        """The parameter or buffer ``name`` itself, read with fx ``get_attr``."""
        axes = tuple(frozenset({(name, k)} if size > 1 else ()) for k, size in enumerate(shape))
        return cls(tuple(shape), axes)

    @classmethod
    def constant_tensor(cls, shape: tuple[int, ...], reason: str) -> FromParameters:
        return cls(tuple(shape), (frozenset(),) * len(shape), reason)

    @property
    def parameter(self) -> str | None:
        """The name of the parameter this tensor is, as it is stored (None otherwise)."""
        names = {name for axis in self.axes for name, _ in axis}
        if len(names) != 1 or self.constant:
            return None
        name = names.pop()
        as_stored = all(
            axis == (frozenset({(name, k)}) if size > 1 else frozenset())
            for k, (axis, size) in enumerate(zip(self.axes, self.shape, strict=True))
        )
        return name if as_stored else None

    @property
    def parameter_axes(self) -> frozenset[ParameterAxis]:
        """Every parameter axis the tensor carries, on any of its axes."""
        return frozenset().union(*self.axes)

    def aligned(self, ndim: int) -> FromParameters:
        """The same tensor seen with ``ndim`` dims, as broadcasting sees it (size-1 dims first)."""
        extra = ndim - len(self.shape)
        if extra <= 0:
            return self
        axes = (frozenset(),) * extra + self.axes
        return FromParameters((1,) * extra + self.shape, axes, self.constant)


def combined(values: list[FromParameters], shape: tuple[int, ...]) -> tuple[FromParameters, str]:
    """The elementwise combination (add, mul, ...) of ``values``, broadcast to ``shape``."""
    axes: list[set[ParameterAxis]] = [set() for _ in shape]
    for value in values:
        value = value.aligned(len(shape))
        for k, carried in enumerate(value.axes):
            if value.shape[k] == shape[k]:
                axes[k] |= carried
    constant = next((value.constant for value in values if value.constant), "")
    result = FromParameters(tuple(shape), tuple(frozenset(a) for a in axes), constant)
    return result, _repeated_axis_problem(result)


def reshaped(value: FromParameters, shape: tuple[int, ...]) -> tuple[FromParameters, str]:
    """``value`` reshaped (view, reshape, flatten, squeeze, unsqueeze) to ``shape``."""
    axes: list[frozenset[ParameterAxis]] = [frozenset() for _ in shape]
    for k, carried in enumerate(value.axes):
        if not carried:
            continue
        new_axis, repeat, problem = reshaped_axis(value.shape, shape, k)
        if problem or repeat != 1:
            return value, problem or "flattens a parameter axis with other dims"
        axes[new_axis] = carried
    return FromParameters(tuple(shape), tuple(axes), value.constant), ""


def broadcast(value: FromParameters, shape: tuple[int, ...]) -> tuple[FromParameters, str]:
    """``value`` expanded to ``shape`` (expand, expand_as, broadcast_to)."""
    return combined([value], shape)


def permuted(value: FromParameters, dims: list[int]) -> FromParameters:
    """``value`` with its axes reordered: new axis k is old axis ``dims[k]``."""
    return FromParameters(
        tuple(value.shape[d] for d in dims), tuple(value.axes[d] for d in dims), value.constant
    )


def reduced(value: FromParameters, dims: set[int], shape: tuple[int, ...]) -> FromParameters:
    """``value`` summed / averaged / maxed over ``dims``: order along them no longer matters."""
    keepdim = len(shape) == len(value.shape)
    kept = [
        frozenset() if k in dims else carried
        for k, carried in enumerate(value.axes)
        if keepdim or k not in dims
    ]
    return FromParameters(tuple(shape), tuple(kept), value.constant)


def _repeated_axis_problem(value: FromParameters) -> str:
    seen: set[ParameterAxis] = set()
    for carried in value.axes:
        if seen & carried:
            return "runs one parameter axis along two tensor axes (an outer product)"
        seen |= carried
    return ""
