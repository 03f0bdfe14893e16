"""Dense linear algebra shared by methods: a damped inverse of a symmetric curvature or Gram matrix."""
from __future__ import annotations

import torch

from ..errors import SettingsError


def damped_inverse(curvature: torch.Tensor, damping: float, absolute_eigenvalues: bool = False) -> torch.Tensor:
    """(G + λI)⁻¹ (P, P) of a symmetric G; absolute_eigenvalues uses |eigenvalues| of G instead."""
    not_definite = SettingsError(f"G + λI with λ={damping:.3g} is not positive definite: raise the damping")
    if absolute_eigenvalues:
        eigenvalues, eigenvectors = torch.linalg.eigh(curvature)
        damped = eigenvalues.abs() + damping
        if damped.min() <= 0:
            raise not_definite
        return (eigenvectors / damped) @ eigenvectors.T
    identity = torch.eye(len(curvature), dtype=curvature.dtype, device=curvature.device)
    factor, info = torch.linalg.cholesky_ex(curvature + damping * identity)  # cheaper than eigh
    if info.item() != 0:
        raise not_definite
    return torch.cholesky_inverse(factor)
