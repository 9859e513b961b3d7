"""The views of every result kind — console report, matplotlib figures, interactive HTML — in one registry.

Views are registered by the view layer (`plipy.report`) with decorators, in the style of transformers'
`AttentionInterface`; results look them up by their class and never import the modules that draw them:

    @VIEWS.summary(ScanResult)
    def summary(result: ScanResult) -> list[Renderable]: ...

    @VIEWS.figure(ScanResult, "layers")
    def layers_figure(result: ScanResult, **options) -> Figure: ...

    @VIEWS.html(ScanResult)
    def view(result: ScanResult, section: Section) -> None: ...

How a view becomes text, PNG bytes or a page (`Renderers`) is registered the same way, once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# The package whose import registers the default views. Views are plugins of the results: this is the one module a
# result names, loaded on first use so that `plipy.results` imports nothing above it.
DEFAULT_VIEWS = "plipy.report"


@dataclass
class FigureView:
    """One plot: `draw(result, **options)` and, for a plot some results cannot draw, `unavailable(result)`: why
    not (None when it can be drawn)."""

    draw: Callable[..., Any]
    unavailable: Callable[[Any], str | None] | None = None

    def why_not(self, result: Any) -> str | None:
        return None if self.unavailable is None else self.unavailable(result)


@dataclass
class KindViews:
    """The views of one result kind: its console report, its figures (in drawing order) and its HTML view."""

    summary: Callable[[Any], list[Any]] | None = None
    figures: dict[str, FigureView] = field(default_factory=dict)
    html: Callable[[Any, Any], None] | None = None


@dataclass
class Renderers:
    """How views become files: console renderables → plain text, a figure → PNG bytes, results → an HTML page."""

    text: Callable[[list[Any]], str]
    png: Callable[[Any], bytes]
    page: Callable[[Sequence[Any], str | None], str]


class Registry:
    """Result class → its views. A kind without a registered view has none of that sort (an HTML page then shows
    its figures as pictures)."""

    def __init__(self) -> None:
        self._kinds: dict[type, KindViews] = {}
        self._renderers: Renderers | None = None
        self._loaded = False

    def _entry(self, kind: type) -> KindViews:
        return self._kinds.setdefault(kind, KindViews())

    def summary(self, kind: type) -> Callable[[F], F]:
        """Register `fn(result) -> [renderable]` as the console report of `kind`."""

        def register(fn: F) -> F:
            self._entry(kind).summary = fn
            return fn

        return register

    def figure(
        self, kind: type, name: str, *, unavailable: Callable[[Any], str | None] | None = None
    ) -> Callable[[F], F]:
        """Register `fn(result, **options) -> Figure` as `kind`'s plot `name` (drawn in registration order);
        `unavailable(result)` says why a result cannot draw it (None: it can)."""

        def register(fn: F) -> F:
            self._entry(kind).figures[name] = FigureView(fn, unavailable)
            return fn

        return register

    def html(self, kind: type) -> Callable[[F], F]:
        """Register `fn(result, section)` as the interactive view of `kind`."""

        def register(fn: F) -> F:
            self._entry(kind).html = fn
            return fn

        return register

    def use(self, renderers: Renderers) -> None:
        """Register how views become text, PNG bytes and pages."""
        self._renderers = renderers

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(DEFAULT_VIEWS)

    def of(self, kind: type) -> KindViews:
        """The views of a result class (its nearest registered base class's if it has none of its own)."""
        self._load()
        for cls in kind.__mro__:
            if cls in self._kinds:
                return self._kinds[cls]
        return KindViews()

    @property
    def renderers(self) -> Renderers:
        """The registered renderers."""
        self._load()
        if self._renderers is None:
            raise RuntimeError(f"no renderers registered: {DEFAULT_VIEWS} registers them on import")
        return self._renderers


VIEWS = Registry()
