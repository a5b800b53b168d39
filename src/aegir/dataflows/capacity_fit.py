"""Hamilton dataflow: fit and check the DC-capacity ↔ array-area relation on USPVDB's own columns.

Relation: ``log(capacity_kwp) = intercept + slope · log(area_m2)``, least squares on the training rows, where
``area_m2`` is USPVDB ``p_area`` (m², the digitised outline of the facility's arrays, inter-row spacing included)
and ``capacity_kwp`` is ``p_cap_dc`` (MW DC) × 1000. The interval is the point estimate times
``exp(q_low)`` … ``exp(q_high)``: quantiles (``interval_quantiles``, default 10 % / 90 %) of the out-of-fold log
residuals of a leave-one-state-out refit over the training states (every residual comes from a state its fit
never saw), so the interval carries the between-state spread of densities.

Split: spatially grouped and deterministic: a state is held out when ``int(sha1(p_state)) % 10 <
heldout_tenths``; nothing of a held-out state is used to fit or to set the interval; the held-out scores (MAPE,
median APE, interval coverage) are computed on those rows only.

Caveat: USPVDB holds ground-mounted utility-scale plants (≥ 1 MW). Rooftop and small commercial systems are
packed differently (no inter-row spacing on a flat-mounted roof, other module densities), and areas far below
USPVDB's smallest plant are an extrapolation: treat such estimates as indicative only (``area_min_m2`` /
``area_max_m2`` record the fitted range). Segmentation masks that trace panel rows without the gaps between them
measure less area than a USPVDB outline, which biases the estimate low.

Input: ``uspvdb_rows`` (a DataFrame with ``case_id``, ``p_state``, ``p_area``, ``p_cap_dc``; see
:func:`aegir.store.capacity_files.read_uspvdb_capacity`); optional ``heldout_tenths``, ``interval_quantiles``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

KW_PER_MW = 1000.0


@dataclass(frozen=True)
class CapacityRelation:
    """``log(kWp) = intercept + slope · log(area_m2)``; interval factors ``exp(log_residual_low/high)`` at the
    quantiles ``interval_quantiles``; fitted on areas ``area_min_m2`` … ``area_max_m2`` (m²)."""

    intercept: float
    slope: float
    log_residual_low: float
    log_residual_high: float
    interval_quantiles: tuple[float, float]
    area_min_m2: float
    area_max_m2: float
    source: str = ""

    def kwp(self, area_m2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, low, high) DC capacity in kWp for areas in m², each shaped like ``area_m2``; 0 for area 0."""
        area = np.asarray(area_m2, dtype=np.float64)
        positive = area > 0
        estimate = np.zeros_like(area)
        estimate[positive] = np.exp(self.intercept + self.slope * np.log(area[positive]))
        return estimate, estimate * np.exp(self.log_residual_low), estimate * np.exp(self.log_residual_high)

    def extrapolated(self, area_m2: np.ndarray) -> np.ndarray:
        """True where the area (m²) lies outside the fitted range, same shape as ``area_m2``."""
        area = np.asarray(area_m2, dtype=np.float64)
        return (area < self.area_min_m2) | (area > self.area_max_m2)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CapacityRelation:
        """From the ``[capacity_dc]`` table of ``aegir/defaults/capacity_dc.toml`` (extra keys ignored)."""
        low_q, high_q = params["interval_quantiles"]
        return cls(float(params["intercept"]), float(params["slope"]), float(params["log_residual_low"]),
                   float(params["log_residual_high"]), (float(low_q), float(high_q)), float(params["area_min_m2"]),
                   float(params["area_max_m2"]), str(params.get("source", "")))


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of y ≈ intercept + slope · x."""
    design = np.column_stack([np.ones_like(x), x])
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(intercept), float(slope)


def usable_rows(uspvdb_rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with a finite positive ``p_area`` and ``p_cap_dc`` and a state, index reset."""
    area = pd.to_numeric(uspvdb_rows["p_area"], errors="coerce")
    capacity = pd.to_numeric(uspvdb_rows["p_cap_dc"], errors="coerce")
    keep = np.isfinite(area) & (area > 0) & np.isfinite(capacity) & (capacity > 0) & uspvdb_rows["p_state"].notna()
    return uspvdb_rows[keep.to_numpy()].reset_index(drop=True)


def log_area(usable_rows: pd.DataFrame) -> np.ndarray:
    """ln(p_area / m²), shape (N,)."""
    return np.log(usable_rows["p_area"].to_numpy(np.float64))


def log_capacity_kwp(usable_rows: pd.DataFrame) -> np.ndarray:
    """ln(p_cap_dc × 1000 / kWp), shape (N,)."""
    return np.log(usable_rows["p_cap_dc"].to_numpy(np.float64) * KW_PER_MW)


def row_states(usable_rows: pd.DataFrame) -> np.ndarray:
    """The state code per row (object array, shape (N,))."""
    return usable_rows["p_state"].astype(str).str.strip().to_numpy(object)


def heldout_mask(row_states: np.ndarray, heldout_tenths: int = 2) -> np.ndarray:
    """True for rows of held-out states: ``int(sha1(state)) % 10 < heldout_tenths``. Shape (N,), bool."""
    if not 0 < heldout_tenths < 10:
        raise ValueError(f"heldout_tenths must be 1..9 (tenths of the state hash space), got {heldout_tenths}")
    buckets = {s: int(hashlib.sha1(s.encode()).hexdigest(), 16) % 10 for s in set(row_states)}
    return np.array([buckets[s] < heldout_tenths for s in row_states], dtype=bool)


def train_coefficients(log_area: np.ndarray, log_capacity_kwp: np.ndarray,
                       heldout_mask: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the log-log least-squares fit on the training rows."""
    return _least_squares(log_area[~heldout_mask], log_capacity_kwp[~heldout_mask])


def out_of_fold_residuals(log_area: np.ndarray, log_capacity_kwp: np.ndarray, heldout_mask: np.ndarray,
                          row_states: np.ndarray) -> np.ndarray:
    """Log residuals (observed − predicted) of each training row under a fit without its state. Shape (N_train,)."""
    x, y, states = log_area[~heldout_mask], log_capacity_kwp[~heldout_mask], row_states[~heldout_mask]
    residuals = np.empty_like(y)
    for state in np.unique(states):
        fold = states == state
        intercept, slope = _least_squares(x[~fold], y[~fold])
        residuals[fold] = y[fold] - (intercept + slope * x[fold])
    return residuals


def residual_quantiles(out_of_fold_residuals: np.ndarray,
                       interval_quantiles: tuple[float, float] = (0.1, 0.9)) -> tuple[float, float]:
    """(low, high) quantiles of the out-of-fold log residuals."""
    low, high = np.quantile(out_of_fold_residuals, interval_quantiles)
    return float(low), float(high)


def fitted_capacity_relation(train_coefficients: tuple[float, float], residual_quantiles: tuple[float, float],
                             usable_rows: pd.DataFrame, heldout_mask: np.ndarray,
                             interval_quantiles: tuple[float, float] = (0.1, 0.9),
                             capacity_source: str = "USPVDB") -> CapacityRelation:
    """The relation fitted on the training rows, with its out-of-fold interval and fitted area range (m²)."""
    train_area = usable_rows["p_area"].to_numpy(np.float64)[~heldout_mask]
    return CapacityRelation(*train_coefficients, *residual_quantiles,
                            (float(interval_quantiles[0]), float(interval_quantiles[1])),
                            float(train_area.min()), float(train_area.max()), capacity_source)


def _scores(relation: CapacityRelation, log_area: np.ndarray, log_capacity: np.ndarray) -> dict[str, float]:
    estimate, low, high = relation.kwp(np.exp(log_area))
    truth = np.exp(log_capacity)
    ape = np.abs(estimate - truth) / truth
    return {"mape": float(ape.mean()), "median_ape": float(np.median(ape)),
            "log_rmse": float(np.sqrt(np.mean((np.log(estimate) - log_capacity) ** 2))),
            "coverage": float(np.mean((truth >= low) & (truth <= high))),
            "below_low": float(np.mean(truth < low)), "above_high": float(np.mean(truth > high))}


def capacity_fit_scores(fitted_capacity_relation: CapacityRelation, log_area: np.ndarray,
                        log_capacity_kwp: np.ndarray, heldout_mask: np.ndarray, row_states: np.ndarray,
                        usable_rows: pd.DataFrame, uspvdb_rows: pd.DataFrame) -> dict[str, Any]:
    """Rows / states per part, and MAPE, median APE, log RMSE and interval coverage on the training rows
    (in-sample) and on the held-out rows (the honest numbers)."""
    parts = {"train": ~heldout_mask, "heldout": heldout_mask}
    scores: dict[str, Any] = {"rows_read": len(uspvdb_rows), "rows_dropped": len(uspvdb_rows) - len(usable_rows)}
    for name, mask in parts.items():
        scores[name] = {"rows": int(mask.sum()), "states": sorted(set(row_states[mask])),
                        **_scores(fitted_capacity_relation, log_area[mask], log_capacity_kwp[mask])}
    return scores
