"""One exception type for every user-facing failure, so the CLI can print one clear line and exit non-zero."""

from __future__ import annotations


class PlipyError(Exception):
    """A problem the user can act on (bad input, unknown model, impossible intervention)."""


class CausalEdgeError(PlipyError):
    """An edge whose key is masked for its query (after it, or outside a sliding window): nothing to steer."""


class MaskedRowError(PlipyError):
    """An intervention would leave a query row with no key to attend to (softmax of all -inf is NaN)."""


class ParameterError(PlipyError, ValueError):
    """A bad value for one parameter. `param` names it as the Python API spells it; the CLI names the flag."""

    def __init__(self, param: str, message: str):
        self.param = param
        self.message = message
        super().__init__(f"{param}: {message}")

    def with_name(self, name: str) -> str:
        """The message with the parameter shown as `name` (e.g. its CLI flag)."""
        return f"{name}: {self.message}"


class NonFiniteError(PlipyError):
    """NaN or ±inf where plipy reads a number (attention weights, logits, a measure): the run stops rather than
    report a number made from it. `layer` and batch `item` say where; `where` names the sample or prompt."""

    def __init__(self, what: str, layer: int | None = None, item: int | None = None, where: str | None = None):
        self.what, self.layer, self.item, self.where = what, layer, item, where
        super().__init__(self._text())

    def _text(self) -> str:
        at = [f"layer {self.layer}"] if self.layer is not None else []
        if self.where:
            at.append(self.where)
        elif self.item is not None:
            at.append(f"batch item {self.item}")
        place = f" at {', '.join(at)}" if at else ""
        return (
            f"non-finite values (NaN or inf) in {self.what}{place}: plipy reports no number made from them "
            "(corrupt weights, or an intervention too large for the model's dtype)"
        )

    def naming(self, where: str) -> NonFiniteError:
        """The same error with its place named (a sample, a prompt)."""
        return NonFiniteError(self.what, self.layer, self.item, where)

    def __reduce__(self) -> tuple:  # Ray ships a worker's error to the driver by pickling it
        return (type(self), (self.what, self.layer, self.item, self.where))


class OutputError(PlipyError, OSError):
    """A file could not be written (disk full, read-only folder, a symlink into nowhere); nothing of its output set
    was replaced. An OSError too, so callers that tolerate a failed write (a cache) still do."""
