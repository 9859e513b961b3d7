"""The steering calibration's result: two groups' baseline attention at one layer and the scale that closes the gap."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class CalibrateResult(Result):
    """`plipy.steer.calibrate`: two groups' baseline attention at one layer and the scale that closes the gap."""

    kind, path_pattern = "calibrate", "calibrate-{model}-L{layer}.json"

    def rows(self) -> list[dict[str, Any]]:
        return calibrate_rows(self._data)


def calibrate_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per sample of a calibration."""
    keys = ("id", "group", "status", "marker_token", "attention", "uniform_null", "scale_to_a", "note")
    return [{k: s.get(k) for k in keys} for s in result["samples"]]
