"""Shared fixtures: tests run on the CPU in float32 unless they say otherwise."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
