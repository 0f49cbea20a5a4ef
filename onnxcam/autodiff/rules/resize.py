"""Resize (every mode and coordinate transform) via the adjoint of its separable matrices."""

from __future__ import annotations

from ..registry import vjp
