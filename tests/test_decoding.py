"""Lossless decoding: greedy Orthrus output equals greedy AR output token for token, whatever
the drafter (oracle: all accepted; random: none; the untrained twin copy), alone or in a batch."""

import random

import pytest
import torch

from orthrus import kernels
from orthrus.cache import KVCache
from orthrus.checkpoint import init_untrained_twins
from orthrus.engine import (SOURCES, PassCosts, PromptLookup, Sequence, SequenceStats, chained_rates, chance_scales,
                            exploration_interval, extension_accepted, most_verify_tokens, plan_cycle, plan_tree)

from .conftest import PROMPTS


def make_oracle(llm, references: list[list[int]], second_every: int = 0):
    """Replace the drafts by the known AR continuation of each row; with `second_every`, at every
    that many-th position the drafter likes another token better and the right one second (a
    tree's leaf catches it)."""
    model = llm.model

    def draft(tokens, positions, kv):
        out = torch.full((tokens.shape[0], tokens.shape[1] - 1, model.config.vocab_size), -1e4)
        for i, row in enumerate(kv.rows.tolist()):
            for j, pos in enumerate(positions[i, :-1].tolist()):
                if pos + 1 < len(references[row]):
                    out[i, j, references[row][pos + 1]] = 0.0
                    if second_every and pos % second_every == 0:
                        out[i, j, (references[row][pos + 1] + 1) % model.config.vocab_size] = 1.0
        return out

    model.draft = draft
    return lambda: delattr(model, "draft")


def randomize_twins(llm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in llm.model.twin_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("name,block,path", [
    ("qwen3", 8, "kernels"), ("smollm2", 6, "kernels"),
    # bf16: exact only because every kernel is batch-invariant (a verify row rounds as a decode step)
    ("qwen3_bf16", 8, "kernels"), ("smollm2_bf16", 6, "kernels"),
    # drafts from int8 weights and activations: other drafts, the same output
    ("qwen3_int8_drafts", 8, "kernels"), ("smollm2_bf16_int8_drafts", 6, "kernels"),
    ("qwen3", 8, "plain"), ("smollm2", 6, "plain"),  # the fallback where the kernels cannot be built
])
def test_greedy_orthrus_equals_ar_with_three_drafters(request, monkeypatch, name, block, path):
    if path == "plain":
        request.getfixturevalue("plain_pytorch")
    elif kernels.unavailable_reason() is not None:  # bf16 is exact through the kernels' batch invariance alone
        pytest.skip(kernels.unavailable_reason())
    llm = request.getfixturevalue(name)
    max_new = 24 if name.startswith("qwen3") else 14
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    ar = llm.generate(prompts, max_new_tokens=max_new, mode="ar")
    expected = [g.token_ids for g in ar]
    assert len({tuple(e) for e in expected}) > 10, "prompts should give varied outputs"

    untrained = llm.generate(prompts, max_new_tokens=max_new, block_size=block)
    assert [g.token_ids for g in untrained] == expected

    restore = make_oracle(llm, [llm.encode(p) + e for p, e in zip(prompts, expected)])
    try:
        oracle = llm.generate(prompts, max_new_tokens=max_new, block_size=block, sources=("diffusion",))
        planned = llm.generate(prompts, max_new_tokens=max_new, block_size=block)  # every source, by the planner
    finally:
        restore()
    assert [g.token_ids for g in oracle] == expected and [g.token_ids for g in planned] == expected
    for g in oracle:  # every draft accepted: full blocks until the budget or EOS cuts the last one
        assert g.stats.cycles <= -(-len(g.token_ids) // block) + 1
    assert sum(sum(g.stats.accepted) for g in oracle) >= sum(len(e) for e in expected) // 2

    # a drafter right only in second place at every third position: the tree's leaves take those (on a
    # machine where an extra verify row costs a twentieth of a pass)
    restore = make_oracle(llm, [llm.encode(p) + e for p, e in zip(prompts, expected)], second_every=3)
    try:
        with monkeypatch.context() as m:  # whether a leaf pays its row depends on the machine's timings
            m.setattr(llm, "pass_costs", lambda *_, **__: PassCosts((0.0,) + tuple(1 + 0.05 * t for t in range(16)), 1.0))
            tree = llm.generate(prompts, max_new_tokens=max_new, block_size=block, sources=("diffusion", "tree"))
    finally:
        restore()
    assert [g.token_ids for g in tree] == expected
    assert sum(sum(g.stats.branches) for g in tree) >= len(prompts)

    randomize_twins(llm)
    try:
        rand = llm.generate(prompts, max_new_tokens=max_new, block_size=block)
    finally:
        init_untrained_twins(llm.model)
    assert [g.token_ids for g in rand] == expected
    diffusion = [a for g in rand for a, s in zip(g.stats.accepted, g.stats.sources) if s == "diffusion"]
    assert diffusion and sum(diffusion) / len(diffusion) < 0.5


@pytest.mark.parametrize("name", ["qwen3", "qwen3_bf16", "qwen3_int8_drafts"])
def test_drafts_from_a_draft_vocabulary_are_the_full_heads_there_and_keep_the_output(request, name):
    if kernels.unavailable_reason() is not None:  # head rows alone bit for bit, and bf16 exact: the kernels' doing
        pytest.skip(kernels.unavailable_reason())
    llm = request.getfixturevalue(name)
    model = llm.model
    cache = KVCache(model.config, 1, 16, next(model.parameters()).dtype, "cpu")
    window = cache.window(torch.tensor([0]), 4, bidirectional=True)
    block = torch.tensor([[7, model.mask_token_id, model.mask_token_id, model.mask_token_id]])
    with torch.inference_mode():
        full = model.draft(block, window.positions, window)
        assert full.shape == (1, 3, model.config.vocab_size)
        model.draft_vocab = vocab = torch.arange(1, model.config.vocab_size, 3)
        try:
            restricted = model.draft(block, window.positions, window)
            assert torch.equal(restricted[..., vocab], full[..., vocab])  # each head row alone, bit for bit
            outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
            outside[vocab] = False
            assert bool((restricted[..., outside] == float("-inf")).all())
            prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:6]]
            expected = [g.token_ids for g in llm.generate(prompts, max_new_tokens=16, mode="ar")]
            drafted = llm.generate(prompts, max_new_tokens=16, block_size=4, sources=("diffusion",))
            assert [g.token_ids for g in drafted] == expected
            sampled = llm.generate(prompts, max_new_tokens=16, block_size=4, temperature=0.8, seed=3, sources=("diffusion",))
            assert all(len(g.token_ids) > 0 for g in sampled)
        finally:
            model.draft_vocab = None


def test_a_cache_window_takes_a_chain_and_its_leaves_and_nothing_else(qwen3):
    cache = KVCache(qwen3.model.config, 2, 16, torch.float32, "cpu")
    cache.lengths[:] = torch.tensor([3, 5])
    rows, depths = torch.tensor([0, 1]), torch.tensor([[0, 1, 2, 3, 1, 2], [0, 1, 2, 3, 0, 0]])
    window = cache.window(rows, 6, bidirectional=False, depths=depths)
    assert torch.equal(window.positions, torch.tensor([[3], [5]]) + depths)  # a leaf sits at its draft's position
    assert torch.equal(window.limits, window.positions + 1)  # and sees the chain before it and itself
    assert torch.equal(window.lasts, torch.tensor([[3], [5]]) + torch.arange(6))  # its own K/V in its own slot
    for bad in ([0, 1, 2, 1, 3, 4],  # a leaf before the chain's end
                [0, 2, 2, 3, 1, 2],  # a token deeper than its index
                [0, 1, 2, 3, 5, 1]):  # a leaf deeper than its index
        with pytest.raises(ValueError, match="a tree's depths"):
            cache.window(rows, 6, bidirectional=False, depths=torch.tensor([bad, [0, 1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="a tree's depths"):
        cache.window(rows, 6, bidirectional=True, depths=depths)
    with pytest.raises(ValueError, match="a tree's depths"):
        cache.window(rows, 5, bidirectional=False, depths=depths)


def test_batch_equals_each_prompt_alone(qwen3):
    prompts = ["Hi", "A much longer prompt that has quite a few more tokens than the first one does.", "Hello there", "Hi"]
    for mode in ("ar", "orthrus"):
        batch = qwen3.generate(prompts, max_new_tokens=20, mode=mode, block_size=4)
        alone = [qwen3.generate(p, max_new_tokens=20, mode=mode, block_size=4) for p in prompts]
        assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
        assert [b.stats.accepted for b in batch] == [a.stats.accepted for a in alone]
        assert [b.stats.sources for b in batch] == [a.stats.sources for a in alone]


def test_lookup_drafts_find_the_latest_earlier_occurrence():
    def lookup(tokens, max_drafts):
        return PromptLookup().drafts(tokens, max_drafts)

    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # latest match of the 3-gram
    assert lookup([5, 2, 3, 6, 4, 2, 3], 2) == [6, 4]  # no earlier 3-gram: the 2-gram
    assert lookup([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup([1, 2, 1, 2], 5) == [1, 2]  # the continuation runs up to the end


def test_prompt_lookup_grown_token_by_token_finds_what_a_scan_of_the_whole_context_finds():
    def scan(tokens, max_drafts):  # the definition: search backwards from the suffix, 3-grams then 2-grams
        for n in (3, 2):
            for start in range(len(tokens) - n - 1, -1, -1):
                if len(tokens) > n and tokens[start : start + n] == tokens[-n:]:
                    return tokens[start + n : start + n + max_drafts]
        return []

    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(8)]  # a small vocabulary: matches of both lengths and misses
    lookup, found = PromptLookup(), set()
    while len(tokens) < 400:
        got = lookup.drafts(tokens, 5)
        assert got == scan(tokens, 5)
        found.add(len(got))
        tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]  # one to a few tokens a cycle
    assert {0, 5} <= found


def test_the_planner_picks_the_source_with_the_most_tokens_per_second():
    seq = Sequence([1, 2, 3, 9, 1, 2, 3])  # a lookup finds [9, 1, 2, 3]
    flat = PassCosts((0.0,) + (1.0,) * 8, 1.0)  # every pass costs the same
    assert plan_cycle([seq], 4, flat, ("diffusion", "ar"), [7])[0].source == "diffusion"  # a new row tries the drafter
    seq.stats = SequenceStats(accepted=[0], sources=["diffusion"], drafted=[3])
    assert plan_cycle([seq], 4, flat, ("diffusion", "ar"), [7])[0].source == "diffusion"  # one unlucky cycle: drafts on
    seq.stats = SequenceStats(accepted=[0] * 8, sources=["diffusion"] * 8, drafted=[3] * 8)  # which accepts nothing
    assert plan_cycle([seq], 4, flat, ("diffusion", "ar"), [7])[0].source == "ar"  # two passes for ~1 token: an AR step
    plan = plan_cycle([seq], 4, flat, SOURCES, [7])[0]
    assert plan.source == "lookup" and plan.drafts == [9, 1, 2, 3]  # free extra rows: every lookup draft
    assert plan_cycle([seq], 4, flat, SOURCES, [2])[0].drafts == [9, 1]  # no more than the row has room for
    linear = PassCosts((0.0,) + tuple(float(t) for t in range(1, 9)), 4.0)  # a pass costs its token count
    assert plan_cycle([seq], 4, linear, SOURCES, [7])[0].source == "ar"  # an unproven lookup does not pay for its rows
    seq.stats = SequenceStats(accepted=[2] * 4, sources=["lookup"] * 4, drafted=[2] * 4)  # lookups accepted whole
    assert plan_cycle([seq], 4, linear, ("lookup", "ar"), [7])[0].source == "ar"  # still, no row is free here
    gentle = PassCosts((0.0,) + tuple(1 + 0.25 * t for t in range(8)), 1.75)  # each extra row costs a quarter step
    assert plan_cycle([seq], 4, gentle, ("lookup", "ar"), [7])[0].drafts == [9, 1, 2, 3]
    seq.stats = SequenceStats(accepted=[0] * 8, sources=["ar"] * 8, drafted=[0] * 8)
    assert plan_cycle([seq], 4, linear, ("diffusion", "ar"), [7])[0].source == "diffusion"  # tries the drafter again


def test_a_lookup_that_starts_right_goes_on_in_the_planners_eyes():
    """Lookups of 4 drafts accepted whole or not at all, in turn: a first draft is a coin flip, a draft
    after accepted ones sure. The planner counts each position at its own rate once the ones before it
    are accepted, so 4 lookup drafts are worth their rows (2.7 tokens for 2.2 steps); at one pooled
    rate a draft (16 of 32: 1/2 each, 1.94 tokens) the best plan would be a single draft."""
    rates = chained_rates([(4, 4), (4, 0)] * 4, 6)
    assert rates[0] == 0.5 and rates[1] == (4 + 2 * 0.5) / 6 and rates[1] < rates[2] < rates[3]
    assert rates[4] == rates[5] == rates[3]  # never offered: a position takes the one before's rate
    seq = Sequence([1, 2, 3, 9, 1, 2, 3])  # a lookup finds [9, 1, 2, 3]
    seq.stats = SequenceStats(accepted=[4, 0] * 4, sources=["lookup"] * 8, drafted=[4] * 8)
    assert seq.stats.lookup_rates(6) == rates
    gentle = PassCosts((0.0,) + tuple(1 + 0.3 * t for t in range(8)), 1.0)
    assert plan_cycle([seq], 4, gentle, ("lookup", "ar"), [7])[0].drafts == [9, 1, 2, 3]


def test_tree_leaves_go_where_the_drafter_is_unsure_and_rows_are_cheap():
    """Draft 1 sure, draft 2 split between two tokens, draft 3 unsure: the best leaf is draft 2's
    runner-up; free rows take leaves up to MAX_LEAVES, best first, rows that cost a pass each none."""
    logits = torch.full((1, 3, 50), -20.0)
    logits[0, 0, 7] = 5.0  # draft 1: token 7, sure
    logits[0, 1, 8], logits[0, 1, 9] = 3.0, 2.9  # draft 2: 8, and 9 nearly as likely
    logits[0, 2, 10:14] = 1.0  # draft 3: four-way
    drafts, kept = torch.tensor([[7, 8, 10]]), torch.tensor([3])
    seq = Sequence([1, 2, 3])
    flat = PassCosts((0.0,) + (1.0,) * 8, 1.0)
    leaves, extensions = plan_tree([seq], logits, drafts, kept, flat, [7])
    assert leaves.tokens[0, 0] == 9 and leaves.depths[0, 0] == 2  # draft 2's runner-up first
    assert leaves.tokens.shape[1] == 4 and set(leaves.depths[0].tolist()) <= {2, 3}  # no leaf beside the sure draft 1
    assert extensions == [[]]  # the drafts' last tokens occur nowhere earlier
    seq.stats = SequenceStats(accepted=[3] * 8, sources=["diffusion"] * 8, drafted=[3] * 8)  # ~3.8 tokens a cycle
    steep = PassCosts((0.0,) + tuple(2.0 * t for t in range(1, 9)), 4.0)  # a row costs two steps
    assert plan_tree([seq], logits, drafts, kept, steep, [7]) == (None, [[]])
    assert plan_tree([seq], logits, drafts, torch.tensor([1]), flat, [7])[0] is None  # only draft 1 verified: nothing unsure
    assert plan_tree([seq], logits, drafts, kept, flat, [7], leaves=False)[0] is None


def test_a_lookup_extension_follows_sure_drafts_where_the_text_went_on_before():
    """The drafts 7 8 10 end with 8 10, which the text had before, followed by 11 12 13 14 15: the
    rows after sure drafts take that continuation as a longer chain (cheap rows: as much as fits
    the passes the costs know and the row's room), leaves beside unsure ones still come first,
    and a row that has seen its extensions refused takes fewer."""
    sure = torch.full((1, 3, 50), -20.0)
    sure[0, 0, 7] = sure[0, 1, 8] = sure[0, 2, 10] = 5.0
    drafts, kept = torch.tensor([[7, 8, 10]]), torch.tensor([3])
    seq = Sequence([1, 8, 10, 11, 12, 13, 14, 15, 2])
    flat = PassCosts((0.0,) + (1.0,) * 8, 1.0)
    leaves, extensions = plan_tree([seq], sure, drafts, kept, flat, [7])
    assert leaves is None and extensions == [[11, 12, 13, 14]]  # 1 + 3 drafts + 4 = the 8 rows measured
    assert plan_tree([seq], sure, drafts, kept, flat, [5])[1] == [[11, 12]]  # room for 5 drafts
    assert plan_tree([seq], sure, drafts, kept, flat, [7], extend=False)[1] == [[]]
    steep = PassCosts((0.0,) + tuple(2.0 * t for t in range(1, 9)), 4.0)
    seq.stats = SequenceStats(accepted=[3] * 8, sources=["diffusion"] * 8, drafted=[3] * 8)  # ~3.8 tokens a cycle
    assert plan_tree([seq], sure, drafts, kept, steep, [7])[1] == [[]]  # rows that cost a pass each: none
    seq.stats = SequenceStats()
    unsure = sure.clone()
    unsure[0, 2, 10:14] = 1.0  # draft 3 four-way: its leaves are likelier than a chain past it
    leaves, extensions = plan_tree([seq], unsure, drafts, kept, flat, [7])
    assert leaves is not None and leaves.tokens.shape[1] == 3 and extensions == [[11]]
    # every extension of recent cycles refused (3 block drafts accepted, then the first extension token not)
    seq.stats = SequenceStats(accepted=[3] * 16, sources=["diffusion"] * 16, drafted=[7] * 16, branches=[0] * 16,
                              extended=[4] * 16)
    assert seq.stats.extension_rates(4) == [1 / 18] * 4 and extension_accepted([3, 5, 2], [7, 7, 3], [4, 4, 0]) == [0, 2, 0]
    gentle = PassCosts((0.0,) + tuple(1 + 0.05 * t for t in range(8)), 1.0)
    assert plan_tree([seq], sure, drafts, kept, gentle, [7])[1] == [[]]  # a 1/18 chance is not worth a row


def test_chance_temperatures_make_a_greedy_rows_likely_draft_likelier_to_the_planner():
    """Draft 1 is the drafter's first choice at 13% (the rest spread over 48 tokens), drafts 2 and 3 sure,
    and the text went on after them before. At the drafter's own distribution a chain past draft 1 looks
    unlikely and no extension pays its rows; with draft position 1's chance temperature 0.25 (a drafter
    whose first choice is the model's far more often than its probability says) two do. A sampling row
    keeps the drafts' own distributions."""
    logits = torch.zeros(2, 3, 50)
    logits[:, 0, 7], logits[:, 0, 9] = 2.0, 1.0
    logits[:, 1, 8] = logits[:, 2, 10] = 12.0
    assert torch.equal(chance_scales(3, (0.25,), [True, False]), torch.tensor([[4.0] * 3, [1.0] * 3]))
    assert chance_scales(3, (), [True, True]) is None and chance_scales(3, (0.25,), [False]) is None
    assert torch.equal(chance_scales(3, (0.5, 0.25), [True]), torch.tensor([[2.0, 4.0, 4.0]]))
    drafts, kept = torch.tensor([[7, 8, 10]]), torch.tensor([3])
    costs = PassCosts((0.0,) + tuple(1 + 0.1 * t for t in range(8)), 1.0)
    text = [1, 8, 10, 11, 12, 13, 14, 15, 2]
    assert plan_tree([Sequence(text)], logits[:1], drafts, kept, costs, [7]) == (None, [[]])
    assert plan_tree([Sequence(text)], logits[:1], drafts, kept, costs, [7], temperatures=(0.25,)) == (None, [[11, 12]])


def test_a_sampling_row_counts_its_drafts_at_its_own_recent_acceptance_rates():
    """Per position, drafts accepted once the ones before were, over the row's drafter cycles: a leaf in a
    draft's place and AR or lookup cycles do not count, an extension past the drafts counts them all.
    The same drafts as above: with no history (1/2 a position) no extension pays its rows; after 16
    cycles that kept every draft, two do. A greedy row goes by its drafts' chances either way."""
    from orthrus.sampling import SamplingParams

    stats = SequenceStats(accepted=[3, 1, 2, 5, 0, 0, 0], drafted=[3, 3, 3, 7, 3, 2, 4], extended=[0, 0, 0, 4, 0, 0, 0],
                          branches=[0, 0, 1, 0, 0, 0, 0], sources=["diffusion"] * 4 + ["ar", "diffusion", "lookup"])
    assert stats.draft_rates(3) == [5 / 7, 3 / 6, 3 / 4]  # (hits + 1) / (tries + 2): tries 5 / 4 / 2
    logits = torch.zeros(1, 3, 50)
    logits[0, 0, 7], logits[0, 0, 9] = 2.0, 1.0
    logits[0, 1, 8] = logits[0, 2, 10] = 12.0
    drafts, kept = torch.tensor([[7, 8, 10]]), torch.tensor([3])
    costs = PassCosts((0.0,) + tuple(1 + 0.1 * t for t in range(8)), 1.0)
    sure = SequenceStats(accepted=[3] * 16, drafted=[3] * 16, extended=[0] * 16, branches=[0] * 16, sources=["diffusion"] * 16)
    for stats, sampled in ((SequenceStats(), [[]]), (sure, [[11, 12]])):
        text = [1, 8, 10, 11, 12, 13, 14, 15, 2]
        sampling, greedy = Sequence(text, SamplingParams(temperature=0.7)), Sequence(text)
        sampling.stats = greedy.stats = stats
        assert plan_tree([sampling], logits, drafts, kept, costs, [7]) == (None, sampled)
        assert plan_tree([greedy], logits, drafts, kept, costs, [7]) == (None, [[]])


def test_greedy_orthrus_with_lookup_extensions_equals_ar(smollm2, monkeypatch):
    """Text the model copies: with every draft right (the oracle drafter), lookup extensions after
    the block draft are verified and accepted, and the output is AR's, alone and in a batch. The
    planner runs on fixed pass costs where rows are cheap: whether extensions pay must not hang on
    how busy the machine was when it timed its passes."""
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump. ")
    prompts = [[{"role": "user", "content": f"Repeat this text exactly, twice:\n{text}"}],
               [{"role": "user", "content": f"Copy the next line:\n{text * 2}"}]]
    expected = [g.token_ids for g in smollm2.generate(prompts, max_new_tokens=40, mode="ar")]
    smollm2.pass_costs(4)  # measured with the model's own draft pass, not the oracle's (the file is kept for later tests)
    cheap_rows = PassCosts((0.0,) + tuple(1 + 0.02 * t for t in range(most_verify_tokens(4))), 0.5)
    monkeypatch.setattr(smollm2, "pass_costs", lambda block_size=None, refresh=False: cheap_rows)
    restore = make_oracle(smollm2, [smollm2.encode(p) + e for p, e in zip(prompts, expected)])
    try:
        batch = smollm2.generate(prompts, max_new_tokens=40, block_size=4, sources=("diffusion", "lookup"))
        alone = [smollm2.generate(p, max_new_tokens=40, block_size=4, sources=("diffusion", "lookup")) for p in prompts]
        # sampling: extensions are one-hot proposals beside sampled drafts; a seeded row repeats in a batch
        sampled = smollm2.generate(prompts, max_new_tokens=40, block_size=4, temperature=0.3, seed=5)
        sampled_alone = smollm2.generate(prompts[1], max_new_tokens=40, block_size=4, temperature=0.3, seed=5)
    finally:
        restore()
    assert [g.token_ids for g in batch] == expected and [g.token_ids for g in alone] == expected
    assert sampled[1].token_ids == sampled_alone.token_ids and sum(sum(g.stats.extended) for g in sampled) > 0
    stats = [g.stats for g in batch]
    assert sum(sum(st.extended) for st in stats) > 0
    assert sum(sum(extension_accepted(st.accepted, st.drafted, st.extended)) for st in stats) >= len(prompts) * 4
    assert max(a for st in stats for a in st.accepted) > 3  # past the block's 3 drafts
    assert all(g.stats.as_dict()["accepted_by_source"]["lookup"] > 0 for g in batch)


def test_the_planner_tries_a_losing_drafter_less_and_less_often():
    seq = Sequence([1, 2, 3])
    # a drafter cycle costs three passes: it must give 3 tokens (2 drafts) to pay, more than the
    # planner's prior expects, so a row with no winning try keeps to AR steps between tries
    flat = PassCosts((0.0,) + (1.0,) * 8, 2.0)
    plan = lambda: plan_cycle([seq], 4, flat, ("diffusion", "ar"), [7])[0].source
    history = lambda *cycles: SequenceStats(accepted=[a for a, _ in cycles], sources=[s for _, s in cycles],
                                            drafted=[3 * (s == "diffusion") for _, s in cycles])
    lost, won, step = (0, "diffusion"), (3, "diffusion"), (0, "ar")
    seq.stats = history(won, *[step] * 8)
    assert exploration_interval(seq.stats, 4, flat) == 8 and plan() == "diffusion"  # tried again after 8 steps
    seq.stats = history(lost, *[step] * 8)
    assert exploration_interval(seq.stats, 4, flat) == 16 and plan() == "ar"  # a lost try: wait 16
    seq.stats = history(lost, *[step] * 16)
    assert plan() == "diffusion"
    seq.stats = history(lost, *[step] * 16, lost, *[step] * 32, lost, *[step] * 40)
    assert exploration_interval(seq.stats, 4, flat) == 64 and plan() == "ar"  # three in a row: the cap
    seq.stats = history(lost, *[step] * 16, lost, *[step] * 32, lost, *[step] * 64)
    assert plan() == "diffusion"
    seq.stats = history(lost, *[step] * 16, lost, *[step] * 32, won, *[step] * 8)
    assert exploration_interval(seq.stats, 4, flat) == 8  # a winning try brings it back


def test_the_planner_weighs_each_row_at_its_own_context_length():
    """A pass costs more per cached token the more tokens it verifies (attention): a drafter cycle
    that pays after a short prompt does not after a long one, and a batch plans each row alone."""
    costs = PassCosts((0.0,) + (1.0,) * 8, 0.8, context=100, verify_per_token=(0.0,) + tuple(0.001 * t for t in range(1, 9)),
                      draft_per_token=0.003)
    assert costs.verify_pass(4, 50) == costs.verify_pass(4, 100) == 1.0 and costs.verify_pass(4, 1100) == 5.0
    assert costs.draft_pass(1100) == 3.8
    short, long = Sequence(list(range(10))), Sequence(list(range(1500)))
    for seq in (short, long):  # the drafter has given 2 of 3 drafts a cycle so far
        seq.stats = SequenceStats(accepted=[2] * 4, sources=["diffusion"] * 4, drafted=[3] * 4)
    plans = plan_cycle([short, long], 4, costs, ("diffusion", "ar"), [7, 7])
    assert [p.source for p in plans] == ["diffusion", "ar"]
    assert [plan_cycle([s], 4, costs, ("diffusion", "ar"), [7])[0].source for s in (short, long)] == ["diffusion", "ar"]


def test_pass_costs_are_measured_once_and_kept(qwen3):
    costs = qwen3.pass_costs(4)
    assert len(costs.verify) >= 9 and costs.draft > 0 and all(t > 0 for t in costs.verify[1:])
    assert list(costs.verify[1:]) == sorted(costs.verify[1:])  # more tokens never cost less
    assert costs.context > 0 and len(costs.verify_per_token) == len(costs.verify) and costs.draft_per_token >= 0
    assert list(costs.verify_per_token[1:]) == sorted(costs.verify_per_token[1:])  # nor a longer cache
    assert qwen3.pass_costs(4) is costs
    qwen3._pass_costs.clear()  # as a new process: read back from the cache folder, not measured again
    assert qwen3.pass_costs(4) == costs


def test_greedy_orthrus_with_lookup_equals_ar_on_repetitive_text(smollm2):
    """Prompts that ask to repeat text: lookup drafts are taken and accepted, and the output is AR's."""
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump. ")
    prompts = [[{"role": "user", "content": f"Repeat this text exactly, twice:\n{text}"}],
               [{"role": "user", "content": f"Copy the next line:\n{text * 2}"}]]
    ar = smollm2.generate(prompts, max_new_tokens=40, mode="ar")
    out = smollm2.generate(prompts, max_new_tokens=40, block_size=4)  # the untrained drafter: lookup must carry it
    assert [g.token_ids for g in out] == [g.token_ids for g in ar]
    lookup = [a for g in out for a, s in zip(g.stats.accepted, g.stats.sources) if s == "lookup"]
    if kernels.unavailable_reason() is None:  # on the plain path a 2-token pass costs ~1.7 steps: AR steps win there
        assert lookup and sum(lookup) >= len(lookup), "lookup drafts should be taken and mostly accepted here"


def test_seeded_sampling_repeats_exactly_alone_or_batched(qwen3):
    kwargs = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234, block_size=4)
    a = qwen3.generate("Once upon a time", **kwargs)
    b = qwen3.generate("Once upon a time", **kwargs)
    assert a.token_ids == b.token_ids
    batched = qwen3.generate(["Something else entirely", "Once upon a time"], **kwargs)
    assert batched[1].token_ids == a.token_ids
    other = qwen3.generate("Once upon a time", **{**kwargs, "seed": 99})
    assert other.token_ids != a.token_ids


def test_stops_cut_inside_an_accepted_block(qwen3):
    prompt = [{"role": "user", "content": "Count"}]
    ref = qwen3.generate(prompt, max_new_tokens=30, mode="ar")
    restore = make_oracle(qwen3, [qwen3.encode(prompt) + ref.token_ids])
    try:
        # max tokens: the oracle accepts whole blocks of 8, the budget of 5 cuts the first one
        short = qwen3.generate(prompt, max_new_tokens=5, block_size=8)
        assert short.token_ids == ref.token_ids[:5] and short.finish_reason == "length"
        assert short.stats.cycles == 1
        # stop string: taken from the middle of the reference text
        stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 3]
        cut = qwen3.generate(prompt, max_new_tokens=30, block_size=8, stop=[stop])
        assert cut.text == ref.text[: ref.text.index(stop)] and cut.finish_reason == "stop"
        # EOS as a stop token inside a block
        eos_at = 3
        qwen3.stop_token_ids, saved = frozenset([ref.token_ids[eos_at]]), qwen3.stop_token_ids
        try:
            eos = qwen3.generate(prompt, max_new_tokens=30, block_size=8)
        finally:
            qwen3.stop_token_ids = saved
        first = ref.token_ids.index(ref.token_ids[eos_at])
        assert eos.token_ids == ref.token_ids[: first + 1] and eos.finish_reason == "stop"
    finally:
        restore()


def test_streaming_yields_the_same_text(qwen3):
    prompt = "Tell me about"
    gen = qwen3.stream(prompt, max_new_tokens=20, block_size=4)
    pieces = []
    try:
        while True:
            pieces.append(next(gen))
    except StopIteration as done:
        result = done.value
    assert "".join(pieces) == result.text == qwen3.generate(prompt, max_new_tokens=20, mode="ar").text


def test_the_shipped_drafter_is_the_default_and_exact(smollm2):
    import orthrus
    from orthrus.hub import DEFAULT_DRAFTER

    llm = orthrus.load(dtype="float32", device="cpu")
    assert llm.drafter_trained and llm.drafter == str(DEFAULT_DRAFTER)
    assert len(llm.model.chance_temperatures) == llm.block_size - 1  # its planner chances, fit on held-out text
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    ar = smollm2.generate(prompts, max_new_tokens=24, mode="ar")
    assert [g.token_ids for g in llm.generate(prompts, max_new_tokens=24)] == [g.token_ids for g in ar]
    drafted = llm.generate(prompts, max_new_tokens=24, sources=("diffusion",))  # the drafter every cycle
    assert [g.token_ids for g in drafted] == [g.token_ids for g in ar]
    untrained = smollm2.generate(prompts, max_new_tokens=24, block_size=llm.block_size, sources=("diffusion",))  # the twin copy

    def per_cycle(gens):
        return sum(len(g.token_ids) for g in gens) / sum(g.stats.cycles for g in gens)
    assert per_cycle(drafted) > per_cycle(untrained) + 0.1


def test_adaptive_verify_stays_exact_and_shortens_the_verify_pass(smollm2):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:6]]
    expected = [g.token_ids for g in smollm2.generate(prompts, max_new_tokens=16, mode="ar")]
    for confidence in (0.3, 0.9):
        adaptive = smollm2.generate(prompts, max_new_tokens=16, block_size=8, draft_confidence=confidence)
        assert [g.token_ids for g in adaptive] == expected
    never_sure = smollm2.generate(prompts, max_new_tokens=16, block_size=8, draft_confidence=1.0, sources=("diffusion",))
    assert [g.token_ids for g in never_sure] == expected
    assert max(a for g in never_sure for a in g.stats.accepted) <= 1  # one draft verified per cycle


def test_lookup_drafts_fit_the_fullest_row_of_a_batch(qwen3):
    """Rows of one verify pass share its width: a short row's long lookup must not overflow the
    cache slots left to a long row near the end of its context."""
    from orthrus.engine import Engine, MAX_LOOKUP_DRAFTS

    short, long = [5, 6, 7, *range(100, 110), 5, 6, 7], [1, 2, 3] * 40  # the short row looks up [100, ..., 106]
    engine = Engine(qwen3.model, 2, len(long) + 1 + 4, block_size=4, sources=("lookup", "ar"),
                    pass_costs=PassCosts.counting_passes(MAX_LOOKUP_DRAFTS + 1))
    seqs = [Sequence(short, max_new_tokens=40), Sequence(long, max_new_tokens=1)]  # the long row: 4 free slots
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()  # raised "KV cache overflow" before the fix
    alone = [qwen3.generate(s.prompt, max_new_tokens=s.max_new_tokens, mode="ar").token_ids for s in seqs]
    assert [s.generated for s in seqs] == alone and "lookup" in seqs[0].stats.sources
