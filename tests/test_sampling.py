"""The sampling transform and the speculative accept rule reproduce the target distribution."""

import math

import pytest
import torch

from orthrus import kernels
from orthrus.errors import OrthrusError
from orthrus.sampling import (NUCLEUS_CANDIDATES, Leaves, SamplingParams, accept, argmax, draw, greedy_accept, sample,
                              sampling_probs, speculative_accept, truncate)


@pytest.fixture(params=["kernels", "plain"])
def vocabulary_path(request):
    """The sampling draws and the accept rule's residual on the CPU kernels (where they build), then on
    plain PyTorch (CUDA's and a machine's without the kernels): both must give the target distribution."""
    if request.param == "plain":
        request.getfixturevalue("plain_pytorch")
    elif kernels.unavailable_reason() is not None:
        pytest.skip(kernels.unavailable_reason())
    assert kernels.takes_fp32(torch.zeros(1)) == (request.param == "kernels")


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of Pearson's chi-square (Wilson-Hilferty normal approximation)."""
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-probability token was emitted"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    k = int(keep.sum()) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_speculative_sampling_reproduces_the_target_distribution(vocabulary_path):
    g = torch.Generator().manual_seed(0)
    n, vocab, k = 200_000, 6, 2
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, -1)
    q[0, 2] = 0.0  # a token the drafter never proposes must still come out at rate p
    q[0] /= q[0].sum()
    P, Q = p.expand(n, -1, -1), q.expand(n, -1, -1)
    drafts = sample(Q, torch.rand(n, k, generator=g))
    accepted, nxt, _ = speculative_accept(P, Q, drafts, torch.rand(n, k, generator=g), torch.rand(n, generator=g))
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    assert chi_square_p_value(torch.bincount(first, minlength=vocab).float(), p[0]) > 1e-3
    # the second emitted token, in cycles that accepted the first draft, follows p_1
    reached = accepted > 0
    second = torch.where(accepted[reached] > 1, drafts[reached, 1], nxt[reached])
    assert chi_square_p_value(torch.bincount(second, minlength=vocab).float(), p[1]) > 1e-3
    # and the test has power: the draft distribution itself is rejected
    assert chi_square_p_value(torch.bincount(drafts[:, 0], minlength=vocab).float(), p[0]) < 1e-6


def test_lookup_drafts_padded_to_the_block_keep_the_target_distribution(vocabulary_path):
    """A lookup draft is a fixed proposal (one-hot q) and rows of one verify pass carry different
    numbers of drafts: each row's tokens still follow p, and a row never accepts past its drafts."""
    g = torch.Generator().manual_seed(1)
    n, vocab, k = 200_000, 6, 3
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, -1)
    lengths = torch.tensor([0, 1, 3]).repeat(n // 3 + 1)[:n]  # no draft, one, a full block
    drafts = torch.tensor([3, 1, 4]).expand(n, -1).clone()  # the looked-up continuation
    q = torch.zeros(n, k, vocab).scatter_(-1, drafts[..., None], 1.0)
    accepted, nxt, _ = speculative_accept(p.expand(n, -1, -1), q, drafts, torch.rand(n, k, generator=g),
                                          torch.rand(n, generator=g), lengths)
    assert bool((accepted <= lengths).all())
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    assert chi_square_p_value(torch.bincount(first, minlength=vocab).float(), p[0]) > 1e-3
    one = (lengths == 1) & (accepted == 1)  # past its only draft a row draws the bonus from p_1
    assert chi_square_p_value(torch.bincount(nxt[one], minlength=vocab).float(), p[1]) > 1e-3
    full = lengths == 3
    second = torch.where(accepted[full & (accepted > 0)] > 1, drafts[full & (accepted > 0), 1], nxt[full & (accepted > 0)])
    assert chi_square_p_value(torch.bincount(second, minlength=vocab).float(), p[1]) > 1e-3


def test_greedy_is_the_one_hot_special_case():
    logits = torch.randn(3, 5, 20)
    probs = sampling_probs(logits, [SamplingParams()] * 3)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(3, 5))
    p, q = probs, sampling_probs(torch.randn(3, 4, 20), [SamplingParams()] * 3)
    drafts = q.argmax(-1)
    drafts[0] = p[0, :4].argmax(-1)  # row 0: every draft is the AR argmax
    accepted, nxt, _ = speculative_accept(p, q, drafts, torch.rand(3, 4), torch.rand(3))
    assert accepted[0] == 4 and nxt[0] == p[0, 4].argmax()
    for r in (1, 2):
        a = int(accepted[r])
        assert torch.equal(drafts[r, :a], p[r, :a].argmax(-1)) and nxt[r] == p[r, a].argmax()


def test_greedy_accept_is_speculative_accept_on_one_hot_distributions():
    g = torch.Generator().manual_seed(3)
    n, k, vocab = 64, 4, 6  # a small vocabulary: drafts often match, rows end at every position
    p = sampling_probs(torch.randn(n, k + 1, vocab, generator=g), [SamplingParams()] * n)
    drafts = torch.randint(0, vocab, (n, k), generator=g)
    drafts[::3] = p[::3, :k].argmax(-1)  # every third row: all drafts right
    lengths = torch.randint(0, k + 1, (n,), generator=g)
    q = torch.zeros(n, k, vocab).scatter_(-1, drafts[..., None], 1.0)
    want = speculative_accept(p, q, drafts, torch.rand(n, k, generator=g), torch.rand(n, generator=g), lengths)
    got = greedy_accept(p.argmax(-1), drafts, lengths)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert set(got[0].tolist()) >= {0, k}  # both ends seen


def test_a_greedy_row_beside_sampling_rows_decides_by_argmax_whatever_its_q():
    """The engine builds draft distributions only when some row samples, and leaves a greedy row's at
    zero: `accept` must still give that row what `greedy_accept` gives, and `draw` its argmaxes."""
    g = torch.Generator().manual_seed(5)
    n, k, vocab = 32, 3, 5
    params = [SamplingParams(), SamplingParams(temperature=0.8)] * (n // 2)
    logits = torch.randn(n, k + 1, vocab, generator=g)
    drafts, q = draw(logits[:, :k] + torch.randn(n, k, vocab, generator=g), params, torch.rand(n, k, generator=g))
    assert q is not None and torch.equal(q[::2], torch.zeros_like(q[::2]).scatter_(-1, drafts[::2, :, None], 1.0))
    q[::2] = 0  # the greedy rows' proposals as the engine leaves them
    lengths = torch.randint(0, k + 1, (n,), generator=g)
    accepted, nxt, _ = accept(logits, params, drafts, q, lengths, torch.rand(n, k, generator=g), torch.rand(n, generator=g))
    want = greedy_accept(logits.argmax(-1), drafts, lengths)
    assert torch.equal(accepted[::2], want[0][::2]) and torch.equal(nxt[::2], want[1][::2])
    greedy_drafts, none = draw(logits, [SamplingParams()] * n, torch.rand(n, k + 1))
    assert none is None and torch.equal(greedy_drafts, logits.argmax(-1))
    assert torch.equal(torch.stack(accept(logits, [SamplingParams()] * n, drafts, None, lengths, None, None)), torch.stack(want))


def test_tree_leaves_keep_the_target_distribution(vocabulary_path):
    """Block draft + leaves: at the first rejected draft, the leaves of its position are tried against
    the residual. What comes out at each position still follows p, leaves are taken (the point of
    them), and greedy rows take a leaf exactly when it is the argmax there."""
    g = torch.Generator().manual_seed(7)
    n, vocab, k = 200_000, 6, 2
    p = torch.softmax(torch.randn(k + 1 + 3, vocab, generator=g) * 1.5, -1)  # rows: drafts 1-2, bonus, leaves 0-2
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, -1)
    P, Q = p.expand(n, -1, -1), q.expand(n, -1, -1)
    drafts = sample(Q, torch.rand(n, k, generator=g))
    # leaves: two other tokens for draft 1's position, one for draft 2's (fixed proposals)
    leaves = Leaves(torch.tensor([[1, 4, 2]]).expand(n, -1), torch.tensor([[1, 1, 2]]).expand(n, -1))
    accepted, nxt, leaf = speculative_accept(P, Q, drafts, torch.rand(n, k, generator=g), torch.rand(n, generator=g),
                                             leaves=leaves, u_leaves=torch.rand(n, 3, generator=g))
    first_leaf = (leaf == 0) | (leaf == 1)
    emitted = torch.where(first_leaf, leaves.tokens[:, 0].where(leaf == 0, leaves.tokens[:, 1]),
                          torch.where(accepted > 0, drafts[:, 0], nxt))
    assert chi_square_p_value(torch.bincount(emitted, minlength=vocab).float(), p[0]) > 1e-3
    assert 0.02 < float(first_leaf.float().mean()) and bool((leaf == 2).any())
    # after a first-position leaf the next token comes from that leaf's own row
    for s in (0, 1):
        assert chi_square_p_value(torch.bincount(nxt[leaf == s], minlength=vocab).float(), p[k + 1 + s]) > 1e-3
    # second position, in cycles that took draft 1: draft 2, its leaf, or the residual draw, following p_1
    reached = (accepted > 0) & ~first_leaf
    second = torch.where(leaf[reached] == 2, leaves.tokens[reached, 2],
                         torch.where(accepted[reached] > 1, drafts[reached, 1], nxt[reached]))
    assert chi_square_p_value(torch.bincount(second, minlength=vocab).float(), p[1]) > 1e-3
    # greedy: the one-hot case agrees with greedy_accept, leaves included
    targets = torch.randint(0, vocab, (64, k + 1 + 3), generator=g)
    d = torch.randint(0, vocab, (64, k), generator=g)
    small = Leaves(torch.randint(0, vocab, (64, 3), generator=g), torch.randint(0, k + 1, (64, 3), generator=g))
    one_hot = torch.zeros(64, k + 1 + 3, vocab).scatter_(-1, targets[..., None], 1.0)
    want = speculative_accept(one_hot, torch.zeros(64, k, vocab).scatter_(-1, d[..., None], 1.0), d, torch.rand(64, k),
                              torch.rand(64), torch.full((64,), k), small, torch.zeros(64, 3))
    got = greedy_accept(targets, d, torch.full((64,), k), small)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and bool((got[2] >= 0).any())


def test_a_repeated_leaf_is_not_tried_again(vocabulary_path):
    """Draft 1 (token 0) is always rejected here (p has no mass on it); the residual is half token 1,
    half token 2. Leaves [1, 1] for that position: the first is taken half the time, and its repeat
    never (its mass left the residual with the refusal), so the rest draw token 2."""
    n = 4000
    p = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).expand(n, -1, -1)
    q = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, -1, -1)
    leaves = Leaves(torch.tensor([[1, 1]]).expand(n, -1), torch.tensor([[1, 1]]).expand(n, -1))
    g = torch.Generator().manual_seed(3)
    draws = torch.zeros(n, 1, dtype=torch.long), torch.rand(n, 1, generator=g), torch.rand(n, generator=g)
    u_leaves = torch.rand(n, 4, generator=g)
    accepted, nxt, leaf = speculative_accept(p, q, *draws, leaves=leaves, u_leaves=u_leaves[:, :2])
    assert not bool((leaf == 1).any()) and 0.45 < float((leaf == 0).float().mean()) < 0.55
    assert bool((nxt[leaf < 0] == 2).all()) and bool((accepted == (leaf == 0).long()).all())
    # the engine draws uniforms for its most leaves a cycle; a cycle with fewer uses the first ones
    wider = speculative_accept(p, q, *draws, leaves=leaves, u_leaves=u_leaves)
    assert all(torch.equal(a, b) for a, b in zip(wider, (accepted, nxt, leaf)))


def test_top_k_top_p_temperature():
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0]]])
    top2 = sampling_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])[0, 0]
    assert (top2 > 0).tolist() == [True, True, False, False, False]
    torch.testing.assert_close(top2[:2], torch.softmax(torch.tensor([4.0, 3.0]), -1))
    soft = torch.softmax(logits[0, 0], -1)  # [0.636, 0.234, 0.086, ...]
    nucleus = sampling_probs(logits, [SamplingParams(temperature=1.0, top_p=0.8)])[0, 0]
    assert (nucleus > 0).tolist() == [True, True, False, False, False]
    hot = sampling_probs(logits, [SamplingParams(temperature=2.0)])[0, 0]
    torch.testing.assert_close(hot, torch.softmax(logits[0, 0] / 2, -1))
    assert soft[0] > hot[0]
    mixed = sampling_probs(logits.expand(2, 1, 5), [SamplingParams(), SamplingParams(temperature=1.0)])
    assert mixed[0, 0].tolist() == [1.0, 0, 0, 0, 0] and torch.allclose(mixed[1, 0], soft)


def nucleus_by_full_sort(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The kept tokens of x [V] by the definition: sort all, keep the top_k, then while the mass above is < top_p."""
    values, order = x.sort(descending=True)
    values[top_k:] = -math.inf
    probs = values.softmax(-1)
    keep = (probs.cumsum(-1) - probs < top_p) & (values > -math.inf)
    keep[0] = True
    return torch.zeros(x.shape, dtype=torch.bool).scatter_(0, order, keep)


def test_top_k_top_p_keep_the_nucleus_a_full_sort_keeps():
    # sharp rows (a nucleus of a few tokens), flat ones (thousands: the candidates widen), every
    # mix of limits in one batch, a top_k past the vocabulary; in fp64, so that no token's mass above
    # it lies within rounding of top_p (where the two sums' orders could decide apart)
    g = torch.Generator().manual_seed(5)
    vocab = 20_000
    scales = [8.0, 3.0, 0.3, 0.05]
    limits = [(0, 0.9), (50, 1.0), (40, 0.5), (0, 0.999), (5000, 0.97), (3 * vocab, 0.8), (1, 0.3)]
    logits = torch.randn(len(limits), len(scales), vocab, generator=g, dtype=torch.float64) * torch.tensor(scales)[:, None]
    kept = truncate(logits, torch.tensor([min(k or vocab, vocab) for k, _ in limits]), torch.tensor([p for _, p in limits]))
    probs = sampling_probs(logits * 0.7, [SamplingParams(temperature=0.7, top_k=k, top_p=p) for k, p in limits])
    for n, (k, p) in enumerate(limits):
        for t in range(len(scales)):
            want = nucleus_by_full_sort(logits[n, t], k or vocab, p)
            assert torch.equal(kept[n, t] > -math.inf, want), (k, p, scales[t])
            torch.testing.assert_close(kept[n, t][want], logits[n, t][want])
            torch.testing.assert_close(probs[n, t], kept[n, t].softmax(-1))
    assert int((kept[0, 3] > -math.inf).sum()) > 4 * NUCLEUS_CANDIDATES  # a nucleus wider than the first candidates
    # a row with no limit beside limited ones keeps every token
    mixed = sampling_probs(logits[:2].float(), [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_p=0.5)])
    assert torch.equal(mixed[0], (logits[0].float() / 0.7).softmax(-1)) and bool((mixed[1] == 0).any())


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-3), dict(seed="x")])
def test_invalid_sampling_parameters_are_rejected(bad):
    with pytest.raises(OrthrusError):
        SamplingParams(**bad)


def test_argmax_is_torchs_first_largest():
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 4, (3, 6, 50), generator=g).float()  # many ties
    logits[0, 0, 7] = float("nan")
    assert torch.equal(argmax(logits), logits.argmax(-1))
    assert torch.equal(argmax(logits[:, 2:4].transpose(0, 1)), logits[:, 2:4].transpose(0, 1).argmax(-1))  # not contiguous
