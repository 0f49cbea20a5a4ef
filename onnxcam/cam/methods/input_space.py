"""Input-space methods: maps at the input's resolution read from the gradient at the input."""

from __future__ import annotations
