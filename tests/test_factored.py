"""`FactoredMatrix` against the dense product it stands for: random factors, batched, non-square and
rank-deficient, in float64 so agreement is tight."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import glassformer as gf
from glassformer.errors import CircuitError
from glassformer.factored import FactoredMatrix, composition_scores


def factors(lead=(), m=6, k=3, n=5, seed=0, rank=None):
    """Random A (*lead, m, k) and B (*lead, k, n) in float64; with `rank`, A B has that rank."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead, m, k, generator=g, dtype=torch.float64)
    B = torch.randn(*lead, k, n, generator=g, dtype=torch.float64)
    if rank is not None:  # zero the last inner columns of A: rank(A B) = rank
        A[..., rank:] = 0
    return A, B


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


SHAPES = [((), 6, 3, 5), ((), 3, 6, 4), ((2, 3), 7, 2, 7), ((4,), 5, 5, 5), ((), 4, 8, 4)]


@pytest.mark.parametrize("lead, m, k, n", SHAPES)
def test_product_svd_and_norm_match_the_dense_matrix(lead, m, k, n):
    A, B = factors(lead, m, k, n)
    fm = FactoredMatrix(A, B)
    dense = A @ B
    r = min(m, k, n)
    assert fm.shape == dense.shape and fm.ndim == dense.dim() and (fm.ldim, fm.mdim, fm.rdim) == (m, k, n)
    close(fm.AB, dense)
    U, S, V = fm.svd()
    assert U.shape == (*lead, m, r) and S.shape == (*lead, r) and V.shape == (*lead, n, r)
    close(U @ torch.diag_embed(S) @ V.mT, dense)
    close(fm.U @ torch.diag_embed(fm.S) @ fm.Vh, dense)
    close(S, torch.linalg.svdvals(dense)[..., :r])
    close(U.mT @ U, torch.eye(r, dtype=U.dtype).expand(*lead, r, r))  # orthonormal columns
    close(V.mT @ V, torch.eye(r, dtype=V.dtype).expand(*lead, r, r))
    close(fm.norm(), torch.linalg.matrix_norm(dense))
    assert torch.equal(fm.rank, torch.linalg.matrix_rank(dense))
    close(fm.collapse_r() @ V.mT, dense)  # U S, then V^T
    close(U @ fm.collapse_l(), dense)  # U, then S V^T
    close(fm.make_even().AB, dense)
    close(fm.T.AB, dense.mT)
    close(fm.get_corner(2), dense[tuple(slice(2) for _ in range(dense.dim()))])


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_rank_deficient_products(rank):
    A, B = factors((2,), 6, 4, 5, seed=1, rank=rank)
    fm = FactoredMatrix(A, B)
    dense = A @ B
    U, S, V = fm.svd()
    close(U @ torch.diag_embed(S) @ V.mT, dense)
    close(S, torch.linalg.svdvals(dense)[..., :4])
    assert fm.rank.tolist() == [rank, rank] == torch.linalg.matrix_rank(dense).tolist()


def nonzero_sorted(values, tol=1e-8):
    """The eigenvalues above `tol` in modulus, sorted by (real, imaginary) part."""
    values = values[values.abs() > tol]
    return sorted(values.tolist(), key=lambda z: (round(z.real, 6), round(z.imag, 6)))


@pytest.mark.parametrize("m, k, rank", [(6, 3, None), (4, 4, None), (3, 5, None), (6, 4, 2)])
def test_eigenvalues_are_the_nonzero_eigenvalues_of_the_dense_product(m, k, rank):
    A, B = factors((), m, k, m, seed=2, rank=rank)
    fm = FactoredMatrix(A, B)
    ours = fm.eigenvalues
    assert ours.is_complex() and ours.shape == (k,)
    theirs = torch.linalg.eigvals(A @ B)
    assert nonzero_sorted(ours) == pytest.approx(nonzero_sorted(theirs), abs=1e-7)
    close(fm.BA, B @ A)


def test_eigenvalues_batched():
    A, B = factors((3,), 5, 2, 5, seed=3)
    fm = FactoredMatrix(A, B)
    for i in range(3):
        assert nonzero_sorted(fm.eigenvalues[i]) == pytest.approx(nonzero_sorted(torch.linalg.eigvals(A[i] @ B[i])))


def test_matmul_with_tensors_and_factored_matrices_on_either_side():
    A, B = factors((2,), 6, 3, 5, seed=4)
    fm = FactoredMatrix(A, B)
    dense = A @ B
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(5, 9, generator=g, dtype=torch.float64)  # rdim -> 9
    tall = torch.randn(7, 6, generator=g, dtype=torch.float64)  # 7 <- ldim
    square = torch.randn(5, 5, generator=g, dtype=torch.float64)
    for product, expected in [
        (fm @ wide, dense @ wide),
        (fm @ square, dense @ square),
        (tall @ fm, tall @ dense),
        (fm @ FactoredMatrix(square, wide), dense @ square @ wide),
        (FactoredMatrix(tall, tall.mT) @ (tall @ fm), tall @ tall.mT @ tall @ dense),
    ]:
        assert isinstance(product, FactoredMatrix)
        close(product.AB, expected)
    vector = torch.randn(5, generator=g, dtype=torch.float64)
    close(fm @ vector, dense @ vector)  # a vector in, a vector (per leading index) out
    row = torch.randn(6, generator=g, dtype=torch.float64)
    close(row @ fm, row @ dense)
    close((2.5 * fm).AB, 2.5 * dense)
    close((fm * 2.5).AB, 2.5 * dense)


def test_the_product_keeps_the_smaller_inner_size():
    A, B = factors((), 8, 2, 8, seed=6)
    fm = FactoredMatrix(A, B)
    assert (fm @ torch.eye(8, dtype=A.dtype)).mdim == 2 and (torch.eye(8, dtype=A.dtype) @ fm).mdim == 2
    wide_inner = FactoredMatrix(*factors((), 3, 6, 3, seed=7))  # mdim 6 > 3: the dense product is smaller
    assert (wide_inner @ torch.eye(3, dtype=A.dtype)).mdim == 3


def test_leading_dims_broadcast():
    A, _ = factors((4, 1), 5, 3, 5)
    _, B = factors((1, 2), 5, 3, 5)
    fm = FactoredMatrix(A, B)
    assert fm.shape == (4, 2, 5, 5)
    close(fm.AB, A @ B)
    close(fm.unsqueeze(0).AB, (A @ B)[None])


def test_indexing_leading_dims_rows_and_columns():
    A, B = factors((3, 4), 6, 2, 5, seed=8)
    fm, dense = FactoredMatrix(A, B), A @ B
    close(fm[1].AB, dense[1])
    close(fm[2, 3].AB, dense[2, 3])
    close(fm[:, 1:3].AB, dense[:, 1:3])
    close(fm[-1, -1].AB, dense[-1, -1])
    close(fm[None, 0].AB, dense[None, 0])
    close(fm[1, 2, 4].AB, dense[1, 2, 4:5])  # an int row stays a matrix: one row
    close(fm[1, 2, -1].AB, dense[1, 2, -1:])
    close(fm[1, 2, 1:4, 3].AB, dense[1, 2, 1:4, 3:4])
    with pytest.raises(IndexError, match="at most 4"):
        fm[0, 0, 0, 0, 0]
    with pytest.raises(IndexError, match="Ellipsis"):
        fm[..., 0]


def test_clear_errors():
    A, B = factors((), 6, 3, 5)
    with pytest.raises(CircuitError, match="same mdim"):
        FactoredMatrix(A, B.mT)
    with pytest.raises(CircuitError, match="broadcast"):
        FactoredMatrix(torch.zeros(2, 4, 3), torch.zeros(3, 3, 4))
    fm = FactoredMatrix(A, B)
    with pytest.raises(CircuitError, match="inner sizes differ"):
        fm @ torch.zeros(4, 2, dtype=A.dtype)
    with pytest.raises(CircuitError, match="inner sizes differ"):
        torch.zeros(2, 5, dtype=A.dtype) @ fm
    with pytest.raises(CircuitError, match="square"):
        _ = fm.eigenvalues
    with pytest.raises(CircuitError, match="composition"):
        composition_scores(fm, fm)
    assert issubclass(CircuitError, gf.GlassformerError) and issubclass(CircuitError, ValueError)


def test_half_precision_decomposes_in_float32():
    A, B = factors((), 6, 3, 6, seed=9)
    fm = FactoredMatrix(A.to(torch.bfloat16), B.to(torch.bfloat16))
    assert fm.S.dtype == torch.float32 and fm.eigenvalues.dtype == torch.complex64
    exact = fm.A.double() @ fm.B.double()  # the bfloat16 factors' product, unrounded
    torch.testing.assert_close(fm.S.double(), torch.linalg.svdvals(exact)[:3], rtol=1e-5, atol=1e-5)


def test_composition_scores_against_dense_norms():
    left = FactoredMatrix(*factors((2, 3), 6, 2, 6, seed=10))
    right = FactoredMatrix(*factors((4,), 6, 3, 5, seed=11))
    scores = composition_scores(left, right)
    assert scores.shape == (2, 3, 4)
    L, R = left.AB, right.AB
    for i in range(2):
        for j in range(3):
            for k in range(4):
                expected = torch.linalg.matrix_norm(L[i, j] @ R[k]) / (
                    torch.linalg.matrix_norm(L[i, j]) * torch.linalg.matrix_norm(R[k])
                )
                close(scores[i, j, k], expected)
    one = composition_scores(left[0, 0], right[1])  # no leading dims: a scalar
    assert one.shape == () and torch.allclose(one, scores[0, 0, 1])


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    m=st.integers(1, 7),
    k=st.integers(1, 7),
    n=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_svd_reconstructs_any_product(lead, m, k, n, seed):
    A, B = factors(tuple(lead), m, k, n, seed=seed)
    fm = FactoredMatrix(A, B)
    U, S, V = fm.svd()
    close(U @ torch.diag_embed(S) @ V.mT, A @ B)
    close(S, torch.linalg.svdvals(A @ B)[..., : min(m, k, n)])
    close(fm.norm(), torch.linalg.matrix_norm(A @ B))


def test_same_answers_as_transformer_lens():
    """TransformerLens' FactoredMatrix on the same factors: products, indexing, singular values,
    eigenvalues, and the collapsed forms up to the sign of each singular vector."""
    tl = pytest.importorskip("transformer_lens")
    A, B = factors((2, 3), 6, 3, 6, seed=12)
    ours, theirs = FactoredMatrix(A, B), tl.FactoredMatrix(A, B)
    extra = torch.randn(6, 4, generator=torch.Generator().manual_seed(13), dtype=A.dtype)
    for index in [(1,), (1, 2), (0, -1, 4), (1, 2, 1, 3), (slice(None), 1)]:
        close(ours[index].AB, theirs[index].AB)
    close((ours @ extra).AB, (theirs @ extra).AB)
    close((extra.mT @ ours).AB, (extra.mT @ theirs).AB)
    close(ours.T.AB, theirs.T.AB)
    close(ours.S, theirs.S)
    close(ours.norm(), theirs.norm())
    close(ours.get_corner(2), theirs.get_corner(2))
    close(ours.collapse_l().mT @ ours.collapse_l(), theirs.collapse_l().mT @ theirs.collapse_l())  # V S² V^T
    close(ours.collapse_r() @ ours.collapse_r().mT, theirs.collapse_r() @ theirs.collapse_r().mT)  # U S² U^T
    close(ours.make_even().AB, theirs.make_even().AB)
    for i in range(2):
        for j in range(3):
            assert nonzero_sorted(ours.eigenvalues[i, j]) == pytest.approx(nonzero_sorted(theirs.eigenvalues[i, j]))
    U, S, V = theirs.svd()  # the third is V, as ours
    close(U @ torch.diag_embed(S) @ V.mT, A @ B)
    close(ours.V.abs(), V.abs())
