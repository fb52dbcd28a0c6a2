"""Solvers of one layer's rounding problem: nearest, GPTQ-class and AdaRound-class.

A Problem holds, per group of the weight (G groups of R output channels and K inputs),
the target W* (the unconstrained best weights), the damped curvature H of the
objective (q - W*) H (q - W*)^T and the starting row scales; a solver returns the
chosen grid levels (G, R, K) and the row scales (G, R). See renorm.reconstruct.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from renorm.errors import RenormError
from renorm.quantize.weights import level_magnitudes, nearest_levels


@dataclass
class Problem:
    """One layer's rounding problem, per group of the weight.

    weight (G, R, K): FP32 weights; target (G, R, K): the unconstrained best weights W*;
    hessian (G, K, K): damped curvature of the objective; linear (G, R, K) = W* H (so the
    objective is q H q^T - 2 q . linear + const); scale (G, R): starting row scales;
    mask (G, R, K) bool or None.
    """

    weight: torch.Tensor
    target: torch.Tensor
    hessian: torch.Tensor
    scale: torch.Tensor
    scheme: str
    bits: int
    mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def linear(self) -> torch.Tensor:
        if "linear" not in self._cache:
            self._cache["linear"] = self.target @ self.hessian  # H symmetric
        return self._cache["linear"]

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ's column order (largest curvature first) and the upper Cholesky factor of H^-1 in that order."""
        if "factor" not in self._cache:
            size = self.hessian.shape[-1]
            order = torch.argsort(torch.diagonal(self.hessian, dim1=1, dim2=2), dim=1, descending=True)
            permuted = self.hessian.gather(1, order[:, :, None].expand(-1, -1, size)).gather(
                2, order[:, None, :].expand(-1, size, -1))
            inverse = torch.cholesky_inverse(_cholesky(permuted))
            self._cache["factor"] = order, torch.linalg.cholesky(inverse, upper=True)
        return self._cache["factor"]

    def levels(self, weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Nearest grid level (in units of the scale) of `weights` for row scales broadcast to them."""
        return nearest_levels(weights / scale, self.scheme, self.bits)

    def error(self, quantized: torch.Tensor) -> torch.Tensor:
        """Objective (q - W*) H (q - W*)^T per row, (G, R)."""
        delta = quantized - self.target
        return ((delta @ self.hessian) * delta).sum(-1)

    def refit_scale(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Closed-form best row scale for fixed levels: <v, W*H> / <v, vH>."""
        numerator = (values * self.linear).sum(-1)
        denominator = ((values @ self.hessian) * values).sum(-1)
        new = numerator / denominator.clamp_min(1e-300)
        return torch.where((denominator > 0) & (new > 0), new, scale)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch of symmetric matrices; where one is not numerically positive
    definite (float32 round-off in a centered, nearly singular H), add 10x more of its mean diagonal until
    it is (GPTQ's dampening, raised only where needed)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    jitter = 1e-6
    while bool((info > 0).any()):
        if jitter > 1e3:
            raise RenormError("a layer's input statistics are degenerate (not a single usable input direction); "
                              "use more or more varied calibration images")
        bad = info > 0
        diagonal = torch.diagonal(matrix[bad], dim1=1, dim2=2).abs().mean(1).clamp_min(1e-12)
        factor[bad], info[bad] = torch.linalg.cholesky_ex(matrix[bad] + jitter * diagonal[:, None, None] * eye)
        jitter *= 10
    return factor


def solve_nearest(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Round W* to the nearest level at the starting scale; return (levels (G, R, K), scale (G, R))."""
    levels = problem.levels(problem.target, problem.scale[..., None])
    if problem.mask is not None:
        levels = levels * problem.mask
    return levels, problem.scale


@contextmanager
def _threads(count: int):
    """Run the block with `count` intra-op threads: loops of tiny ops are slower with more (each op
    waits at a barrier for every thread, and on a shared machine for threads that are not running)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _small(tensor: torch.Tensor) -> int:
    """Threads worth using for element-wise work on a tensor of this size."""
    return 1 if tensor.numel() < 1 << 16 else torch.get_num_threads()


def _gptq_round(problem: Problem, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """One GPTQ pass at fixed row scales; returns the levels (G, R, K)."""
    groups, rows, size = problem.target.shape
    order, upper = problem.factor()
    inverse_order = torch.argsort(order, dim=1)
    gather = order[:, None, :].expand(groups, rows, size)
    work = problem.target.gather(2, gather).clone()
    mask = problem.mask.gather(2, gather) if problem.mask is not None else None
    result = torch.zeros_like(work)
    row_scale = scale[..., None]
    for start in range(0, size, block):
        stop = min(start + block, size)
        chunk = work[:, :, start:stop].clone()
        errors = torch.zeros_like(chunk)
        corner = upper[:, start:stop, start:stop]
        with _threads(_small(chunk)):
            _gptq_block(problem, chunk, errors, corner, result[:, :, start:stop], row_scale,
                        mask[:, :, start:stop] if mask is not None else None)
        work[:, :, stop:] -= errors @ upper[:, start:stop, stop:]
    return result.gather(2, inverse_order[:, None, :].expand(groups, rows, size))


def _gptq_block(problem: Problem, chunk: torch.Tensor, errors: torch.Tensor, corner: torch.Tensor,
                result: torch.Tensor, row_scale: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Round one block of columns in place, feeding each column's error to the columns after it."""
    for i in range(chunk.shape[-1]):
        column = chunk[:, :, i:i + 1]
        levels = problem.levels(column, row_scale)
        if mask is not None:
            levels = levels * mask[:, :, i:i + 1]
        result[:, :, i:i + 1] = levels
        error = (column - levels * row_scale) / corner[:, i, i][:, None, None]
        chunk[:, :, i:] -= error * corner[:, None, i, i:]
        errors[:, :, i:i + 1] = error


def _signed_grid(problem: Problem, like: torch.Tensor) -> torch.Tensor:
    """Every level of the grid (in units of the scale), ascending: -top ... 0 ... top."""
    magnitudes = level_magnitudes(problem.scheme, problem.bits).to(like.device, like.dtype)
    return torch.cat([-magnitudes.flip(0)[:-1], magnitudes])


def descend(problem: Problem, values: torch.Tensor, scale: torch.Tensor, sweeps: int = 1,
            block: int = 128) -> torch.Tensor:
    """Coordinate descent on the layer objective at fixed row scales: weight by weight (all rows at
    once), move to the level just below or just above where that lowers (q - W*) H (q - W*)^T, the
    gradient updated after every move (exact but for float round-off, so solve_gptq keeps a row's result
    only where it is no worse). Returns the levels (G, R, K)."""
    grid = _signed_grid(problem, values)
    last = len(grid) - 1
    hessian = problem.hessian
    groups, rows, size = values.shape
    row_scale = scale[..., None]
    q = values.clone()
    gradient = (q * row_scale - problem.target) @ hessian  # half the objective's gradient, weight units
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2)
    for _ in range(sweeps):
        moved = 0
        for start in range(0, size, block):
            stop = min(start + block, size)
            local = gradient[:, :, start:stop].clone()
            steps = torch.zeros(groups, rows, stop - start, dtype=q.dtype, device=q.device)
            corner = hessian[:, start:stop, start:stop]
            with _threads(_small(local)):
                for i in range(stop - start):
                    k = start + i
                    current = q[:, :, k]
                    index = torch.searchsorted(grid, current.contiguous())
                    best_change = torch.zeros_like(current)
                    best_level = current
                    for neighbour in (grid[(index - 1).clamp(min=0)], grid[(index + 1).clamp(max=last)]):
                        delta = (neighbour - current) * scale
                        change = delta * delta * diagonal[:, k, None] + 2 * delta * local[:, :, i]
                        take = change < best_change
                        best_change = torch.where(take, change, best_change)
                        best_level = torch.where(take, neighbour, best_level)
                    if problem.mask is not None:
                        best_level = torch.where(problem.mask[:, :, k] > 0, best_level, current)
                    step = (best_level - current) * scale
                    q[:, :, k] = best_level
                    steps[:, :, i] = step
                    local += step[:, :, None] * corner[:, None, i, :]
            gradient += steps @ hessian[:, start:stop, :]
            moved += int((steps != 0).sum())
        if moved == 0:
            break
    return q


def solve_gptq(problem: Problem, rounds: int = 2, sweeps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding; between rounds the row scales are refitted in closed form."""
    best_values, best_scale = solve_nearest(problem)  # at 2 bits, error feedback can lose to it
    best_error = problem.error(best_values * best_scale[..., None])
    scale = problem.scale
    for _ in range(max(1, rounds)):
        values = _gptq_round(problem, scale)
        error = problem.error(values * scale[..., None])
        better = error < best_error
        best_values = torch.where(better[..., None], values, best_values)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
        scale = problem.refit_scale(values, scale)
    # the closed-form scale for the final levels never increases the error
    refit = problem.refit_scale(best_values, best_scale)
    if sweeps > 0:  # kept row by row only where it is no worse (float32 round-off in the running gradient)
        descended = descend(problem, best_values, refit, sweeps)
        return _rows_no_worse(problem, (descended, problem.refit_scale(descended, refit)), (best_values, refit))
    return best_values, refit


def _rows_no_worse(problem: Problem, candidate: tuple[torch.Tensor, torch.Tensor],
                   kept: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, row scales): the candidate's rows where their objective is no higher than the kept ones'."""
    (values, scale), (kept_values, kept_scale) = candidate, kept
    better = problem.error(values * scale[..., None]) <= problem.error(kept_values * kept_scale[..., None])
    return torch.where(better[..., None], values, kept_values), torch.where(better, scale, kept_scale)


def _neighbours(x: torch.Tensor, scheme: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid levels just below and just above |x| (x in units of the scale), as magnitudes."""
    magnitudes = level_magnitudes(scheme, bits).to(x.device, x.dtype)
    top = float(magnitudes[-1])
    size = x.abs().clamp(max=top)
    index = (torch.searchsorted(magnitudes, size.contiguous(), right=True) - 1).clamp(0, len(magnitudes) - 1)
    lower = magnitudes[index]
    upper = magnitudes[(index + 1).clamp(max=len(magnitudes) - 1)]
    return lower, torch.where(size >= top, lower, upper)


_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


def solve_adaround(problem: Problem, steps: int = 1000, learning_rate: float = 0.1,
                   regularization: float = 3.0, warmup: float = 0.2,
                   start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned rounding (up or down per weight) on the quadratic objective; returns (values, scale)."""
    scale = problem.scale if start is None else start[1]
    row_scale = scale[..., None]
    x = problem.target / row_scale
    sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    lower, upper = _neighbours(x, problem.scheme, problem.bits)
    if problem.mask is not None:
        lower, upper = lower * problem.mask, upper * problem.mask
    gap = upper - lower
    if start is not None:  # start from a given rounding (e.g. GPTQ's): up where it rounded up
        fraction = ((start[0].abs() - lower) / gap.clamp_min(1e-12)).clamp(0.25, 0.75)
    else:
        fraction = ((x.abs().clamp(max=upper) - lower) / gap.clamp_min(1e-12)).clamp(0.01, 0.99)
    logits = -torch.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1)
    logits = logits.float().requires_grad_(True)
    hessian = problem.hessian.float()
    target = problem.target.float()
    lower_f, gap_f, sign_f, scale_f = lower.float(), gap.float(), sign.float(), row_scale.float()
    nearest = sign * torch.where(x.abs() - lower >= gap / 2, upper, lower) * row_scale
    normalizer = float(problem.error(nearest).sum().clamp_min(1e-30))
    optimizer = torch.optim.Adam([logits], lr=learning_rate)
    free = gap_f > 0
    count = max(1, int(free.sum()))
    warm = int(warmup * steps)
    with torch.enable_grad(), _threads(_small(logits)):
        for step in range(steps):
            soft = (torch.sigmoid(logits) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
            delta = sign_f * (lower_f + soft * gap_f) * scale_f - target
            loss = ((delta @ hessian) * delta).sum() / normalizer
            if step >= warm:
                beta = 20 + (2 - 20) * (step - warm) / max(1, steps - warm)
                loss = loss + regularization * ((1 - (2 * soft[free] - 1).abs() ** beta).sum() / count)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    up = (logits.detach() >= 0).to(x.dtype)
    values = sign * (lower + up * gap)
    values, _ = _rows_no_worse(problem, (values, scale), (nearest / row_scale, scale))  # never worse than nearest
    return values, problem.refit_scale(values, scale)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "nearest": lambda problem, config: solve_nearest(problem),
    "gptq": lambda problem, config: solve_gptq(problem, config.rounds, config.sweeps),
    "adaround": lambda problem, config: solve_adaround(problem, config.steps, config.learning_rate,
                                                       config.regularization),
}
