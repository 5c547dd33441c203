import numpy as np
import pytest

from splitllm.services.common.topk import CHUNK, largest, top_k


@pytest.mark.parametrize("n", [1, 7, CHUNK * 3 + 5, 49152, 49152 + 77])
@pytest.mark.parametrize("k", [0, 1, 2, 40, 64, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_a_full_sort(n, k, ties):
    rng = np.random.default_rng(n * 1000 + k)
    x = rng.standard_normal(n).astype(np.float32)
    if ties:  # few distinct values: the k-th largest is shared by many chunks
        x = np.round(x * 2).astype(np.float32)
    values, ids = top_k(x, k)
    if k == 0 or k >= n:
        assert ids is None and values is x
        return
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(x[ids], values)
    expected = np.sort(np.lexsort((np.arange(n), -x))[:k])  # by value, then the lower id first
    np.testing.assert_array_equal(ids, expected)


def test_largest_takes_the_lower_positions_at_a_tie():
    assert largest(np.array([1, 3, 2, 3, 3, 0], np.float32), 2).tolist() == [1, 3]
    assert largest(np.array([1, 3, 2, 3, 3, 0], np.float32), 4).tolist() == [1, 2, 3, 4]


def test_greedy_takes_the_lowest_id_of_a_tie():
    x = np.zeros(1000, np.float32)
    x[[5, 9]] = 3.0
    assert top_k(x, 1)[1].tolist() == [5]
