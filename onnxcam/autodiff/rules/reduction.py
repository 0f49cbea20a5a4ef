"""ReduceSum, ReduceMean, ReduceMax and friends."""

from __future__ import annotations

from ..registry import vjp
