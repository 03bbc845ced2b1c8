"""`FactoredMatrix`: a product `A @ B` kept as its two factors, as TransformerLens has it.

A head's QK (`W_Q @ W_K^T`) and OV (`W_V @ W_O`) circuits are d_model × d_model matrices of rank at
most d_head. Kept factored, a product with other matrices stays small, and the SVD, the norm and
the eigenvalues come from d_head-sized pieces: the SVD from a QR decomposition of each factor and
the SVD of the small core between them; the eigenvalues from `B @ A` (d_head × d_head).

Leading (batch) dimensions broadcast between A and B, so one object holds every head of every layer.
Legend: ... (leading dims), ldim (rows of A B), mdim (the inner size), rdim (columns of A B),
r = min(ldim, mdim, rdim).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from glassformer.errors import CircuitError


class FactoredMatrix:
    """The matrix `A @ B`, A (..., ldim, mdim) and B (..., mdim, rdim), never formed unless asked (`.AB`)."""

    def __init__(self, A: Tensor, B: Tensor) -> None:
        if A.dim() < 2 or B.dim() < 2 or A.shape[-1] != B.shape[-2]:
            raise CircuitError(
                f"a factored matrix needs A (..., ldim, mdim) and B (..., mdim, rdim) with the same mdim, "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise CircuitError(
                f"the leading dims of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast"
            ) from None
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.A = A.broadcast_to(*lead, self.ldim, self.mdim)  # (..., ldim, mdim)
        self.B = B.broadcast_to(*lead, self.mdim, self.rdim)  # (..., mdim, rdim)
        self.shape = torch.Size((*lead, self.ldim, self.rdim))
        self._svd: tuple[Tensor, Tensor, Tensor] | None = None

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"

    @property
    def ndim(self) -> int:
        """Number of dimensions of the product, leading ones included."""
        return len(self.shape)

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        """(A, B), the factors, leading dims broadcast."""
        return self.A, self.B

    @property
    def AB(self) -> Tensor:
        """The product itself (..., ldim, rdim): dense, possibly large."""
        return self.A @ self.B

    @property
    def BA(self) -> Tensor:
        """The reversed product (..., mdim, mdim); only for a square A B."""
        self._need_square("BA")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose (B^T A^T), still factored."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other: Tensor | FactoredMatrix) -> Tensor | FactoredMatrix:
        """`self @ other`: a FactoredMatrix for a matrix (factored or not), a tensor (..., ldim) for a vector."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        self._check_inner(self.rdim, other.shape[0 if other.dim() == 1 else -2], other.shape, "self @ other")
        if other.dim() == 1:  # as a column, so that leading dims broadcast
            return (self.A @ (self.B @ other[:, None]))[..., 0]  # (..., ldim)
        if self.rdim > self.mdim:  # the product's inner size stays the smaller one
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> Tensor | FactoredMatrix:
        """`other @ self`: a FactoredMatrix for a matrix, a tensor (..., rdim) for a vector."""
        self._check_inner(other.shape[-1], self.ldim, other.shape, "other @ self")
        if other.dim() == 1:  # as a row
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]  # (..., rdim)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """The product times a scalar (applied to A)."""
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index the leading dims (`qk[3, 5]`: layer 3, head 5); one or two more entries select rows,
        then columns, kept as matrices (an int i becomes i:i+1), as TransformerLens does."""
        index = index if isinstance(index, tuple) else (index,)
        n_lead = self.ndim - 2
        used = sum(i is not None for i in index)
        if any(i is Ellipsis for i in index) or used > self.ndim:
            raise IndexError(
                f"index {index} of a FactoredMatrix of shape {tuple(self.shape)}: give at most {self.ndim} "
                "entries (ints, slices, None), no Ellipsis"
            )
        if used <= n_lead:
            return FactoredMatrix(self.A[index], self.B[index])
        lead, rest = _split_index(index, n_lead)
        if any(entry is None for entry in rest):
            raise IndexError(f"index {index}: None (a new dim) only among the {n_lead} leading dims")
        rows = _keep_dim(rest[0])
        cols = _keep_dim(rest[1]) if len(rest) > 1 else slice(None)
        return FactoredMatrix(self.A[(*lead, rows)], self.B[(*lead, slice(None), cols)])

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """A new leading dim of size 1 at `dim` (counted among the leading dims)."""
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U, S, V) with `U @ S.diag_embed() @ V.mT == A @ B`: U (..., ldim, r), S (..., r) descending,
        V (..., rdim, r), as TransformerLens returns them (V, not torch's Vh; `.Vh` is V^T). From the
        factors alone: A = Qa Ra and B^T = Qb Rb (QR), then the SVD of the small core Ra Rb^T.
        Computed once per FactoredMatrix; 16-bit factors are decomposed in float32."""
        if self._svd is None:
            A, B = _at_least_float32(self.A), _at_least_float32(self.B)
            qa, ra = torch.linalg.qr(A)  # (..., ldim, min(ldim, mdim)), (..., min(ldim, mdim), mdim)
            qb, rb = torch.linalg.qr(B.mT)  # (..., rdim, min(rdim, mdim)), (..., min(rdim, mdim), mdim)
            u_core, s, vh_core = torch.linalg.svd(ra @ rb.mT, full_matrices=False)  # core: (.., r, r) at most
            self._svd = qa @ u_core, s, qb @ vh_core.mT  # (..., ldim, r), (..., r), (..., rdim, r)
        return self._svd

    @property
    def U(self) -> Tensor:
        """Left singular vectors (..., ldim, r), as columns."""
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        """Singular values (..., r), descending."""
        return self.svd()[1]

    @property
    def V(self) -> Tensor:
        """Right singular vectors (..., rdim, r), as columns."""
        return self.svd()[2]

    @property
    def Vh(self) -> Tensor:
        """V transposed (..., r, rdim), so that `U @ S.diag_embed() @ Vh == A @ B` (TransformerLens'
        deprecated `Vh` returned V itself)."""
        return self.svd()[2].mT

    def norm(self) -> Tensor:
        """Frobenius norm (...,): the root of the sum of the squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    @property
    def rank(self) -> Tensor:
        """Numerical rank (...,): singular values above max(ldim, rdim) · eps · the largest one,
        the tolerance of `torch.linalg.matrix_rank`."""
        s = self.S  # (..., r)
        tol = max(self.ldim, self.rdim) * torch.finfo(s.dtype).eps * s.amax(-1, keepdim=True)
        return (s > tol).sum(-1)

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalues of B A (..., mdim), complex: those of the square A B apart from zeros
        (if B A v = λ v then A B (A v) = λ A v), found in an mdim × mdim problem."""
        return torch.linalg.eigvals(_at_least_float32(self.BA))

    def collapse_l(self) -> Tensor:
        """S V^T (..., r, rdim): the product with its left orthonormal factor U dropped."""
        return self.S[..., :, None] * self.V.mT

    def collapse_r(self) -> Tensor:
        """U S (..., ldim, r): the product with its right orthonormal factor V^T dropped."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> FactoredMatrix:
        """The same product as U √S and √S V^T: orthogonal factors sharing the singular values evenly."""
        root = self.S.sqrt()  # (..., r)
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

    def get_corner(self, k: int = 3) -> Tensor:
        """The first k entries along every dim of the product, leading ones included (dense, small)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]  # (..., k, k)
        return corner[tuple(slice(k) for _ in range(corner.dim()))]

    def _need_square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise CircuitError(f"{what} needs a square product, this one is {self.ldim} × {self.rdim}")

    @staticmethod
    def _check_inner(left: int, right: int, other_shape: torch.Size, what: str) -> None:
        if left != right:
            raise CircuitError(f"{what}: inner sizes differ ({left} vs {right}; other is {tuple(other_shape)})")


def composition_scores(left: FactoredMatrix, right: FactoredMatrix) -> Tensor:
    """‖L R‖_F / (‖L‖_F ‖R‖_F) for every L among `left`'s matrices and R among `right`'s: left
    (*l, ldim, k) and right (*r, k, rdim) give (*l, *r), as TransformerLens'
    `utils.composition_scores` with broadcast dims. Computed from S V^T of L and U S of R (the
    orthonormal outer factors do not change a Frobenius norm), one left matrix at a time."""
    if left.rdim != right.ldim:
        raise CircuitError(f"composition needs left's columns to match right's rows: {left.shape} vs {right.shape}")
    lead_l, lead_r = left.shape[:-2], right.shape[:-2]
    sv = left.collapse_l().flatten(0, -3) if lead_l else left.collapse_l()[None]  # (n_left, r_l, k)
    us = right.collapse_r().flatten(0, -3) if lead_r else right.collapse_r()[None]  # (n_right, k, r_r)
    products = [torch.einsum("ak,ykb->yab", one, us).norm(dim=(-2, -1)) for one in sv]  # each (n_right,)
    norms = left.norm().reshape(-1, 1) * right.norm().reshape(1, -1)  # (n_left, n_right)
    return (torch.stack(products) / norms).reshape(lead_l + lead_r)


def _at_least_float32(t: Tensor) -> Tensor:
    """Half and bfloat16 tensors in float32 (no QR, SVD or eig for them on every device)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _split_index(index: tuple, n_lead: int) -> tuple[tuple, tuple]:
    """`index` split after its first `n_lead` non-None entries: (leading part, the rest)."""
    seen = 0
    for pos, entry in enumerate(index):
        if seen == n_lead:
            return index[:pos], index[pos:]
        seen += entry is not None
    return index, ()


def _keep_dim(entry: Any) -> Any:
    """An int index as a one-long slice, so the matrix keeps its two dims."""
    if isinstance(entry, int):
        return slice(entry, entry + 1 if entry != -1 else None)
    return entry
