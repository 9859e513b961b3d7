"""One exception type for every user-facing failure, so the CLI can print one clear line and exit non-zero."""


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
