"""Linear imputation of removed pixels (ROAD's "noisy linear imputer", Rong et al. 2022), batched.

Each removed pixel becomes the weighted mean of its eight neighbours inside the image (weights 1/6
for the four sides, 1/12 for the four corners, renormalised at the border), where neighbours that
are removed too are unknowns of the same linear system. Filling a hole this way leaves no sharp
edge or constant patch for the network to read the removal from, which is what makes ROAD's
scores about the removed *information* rather than about the removal's shape.

The equations are those of ``pytorch_grad_cam.metrics.road.NoisyLinearImputer`` (Rong's reference
code), which builds one sparse system per image and removal in a Python loop and solves it with
SuperLU: about 5 ms a system here, 18 systems per image. The same systems are solved here exactly
(a direct method, in float64 like the package's solve), all at once, in torch: written over the
whole image, with ``x = v`` for every kept pixel, each system is block tridiagonal, one 32x32
block per image row (a pixel's neighbours are in its row and the rows above and below), so block
Gaussian elimination solves every system of a batch in one sweep of batched 32x32 solves down the
rows and one back up; on whatever device the images are. Kept pixels make the matrix strictly
diagonally dominant in their rows and every removed region touches one, so the elimination needs
no pivoting across blocks. The package adds Gaussian noise of standard deviation 0.01 to the
filled values; here the default is none, so the same image and mask always give the same answer.
"""

from __future__ import annotations

import torch

# ((row offset, column offset), weight): the package's ``neighbors_weights``, in its order.
NEIGHBOUR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12),
    ((0, 1), 1 / 6),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((0, -1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
)


def _inside_weight(height: int, width: int) -> torch.Tensor:
    """Per pixel, 1 minus the weights of its neighbours outside the image (the package's
    ``sum_neighbors``, the diagonal of a removed pixel's equation, subtracted in its order)."""
    total = torch.ones(height, width, dtype=torch.float64)
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
        outside = (rows + dy < 0) | (rows + dy >= height) | (cols + dx < 0) | (cols + dx >= width)
        total[outside] -= weight
    return total


def _row_coupling(width: int, offset: int) -> torch.Tensor:
    """(width, width): the weights of the neighbours in the row ``offset`` (-1, 0, 1) rows away."""
    matrix = torch.zeros(width, width, dtype=torch.float64)
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
        if dy == offset:
            matrix += weight * torch.diag(torch.ones(width - abs(dx), dtype=torch.float64), dx)
    return matrix


def linear_impute(images: torch.Tensor, keep: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """``images`` (M, C, H, W) float with the pixels where ``keep`` (M, H, W) is False filled in;
    float32, on the images' device.

    An image with every pixel removed has no known value to spread: its system's right-hand side is
    zero and so is its solution (what the package's solve returns too), so it comes back as zeros,
    the mean image after normalisation.
    """
    count, _, height, width = images.shape
    if keep.shape != (count, height, width):
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match images {tuple(images.shape)}")
    device = images.device
    keep = keep.to(device=device, dtype=torch.bool)
    nothing_kept = ~keep.flatten(1).any(1)
    # Such an image is solved as "every pixel kept, at 0": the same answer, without a singular system.
    known = (keep | nothing_kept.view(-1, 1, 1)).to(torch.float64).transpose(0, 1).contiguous()  # (H, M, W)
    removed = 1.0 - known
    values = images.to(torch.float64).permute(2, 0, 3, 1) * (known * (~nothing_kept).view(1, -1, 1)).unsqueeze(-1)
    values = values.contiguous()  # (H, M, W, C): the right-hand side, x = v where kept, 0 where removed
    diagonal = -_inside_weight(height, width).to(device)
    up, side, down = (_row_coupling(width, offset).to(device) for offset in (-1, 0, 1))
    eye = torch.eye(width, dtype=torch.float64, device=device)

    # Forward sweep (block Thomas algorithm): row r's equations, with row r-1 eliminated, solved for
    # row r in terms of row r+1: x_r = solved_r - coupling_r x_{r+1}.
    coupling, solved = [], []
    for row in range(height):
        weights = removed[row].unsqueeze(-1)  # (M, W, 1): 1 in a removed pixel's equation
        matrix = weights * (side + torch.diag(diagonal[row])) + known[row].unsqueeze(-1) * eye
        rhs = values[row]
        if row > 0:
            lower = weights * up  # couples row r to row r-1 (its upper neighbours)
            matrix = matrix - lower @ coupling[-1]
            rhs = rhs - lower @ solved[-1]
        upper = weights * down if row + 1 < height else torch.zeros_like(matrix)
        result, _ = torch.linalg.solve_ex(matrix, torch.cat([upper, rhs], dim=2))
        coupling.append(result[..., :width])
        solved.append(result[..., width:])
    # Back substitution, last row first.
    rows = [solved[-1]]
    for row in range(height - 2, -1, -1):
        rows.append(solved[row] - coupling[row] @ rows[-1])
    filled = torch.stack(rows[::-1], dim=1)  # (M, H, W, C)
    if not bool(torch.isfinite(filled).all()):  # cannot happen for finite images (see the module docstring)
        raise FloatingPointError("linear imputation produced non-finite values")
    if noise:
        filled = filled + noise * torch.randn_like(filled)
    out = torch.where(keep[..., None], images.permute(0, 2, 3, 1).to(torch.float32), filled.to(torch.float32))
    return out.permute(0, 3, 1, 2).contiguous()
