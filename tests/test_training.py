"""Drafter training: the batched training pass is the inference draft pass, only the twins learn,
runs resume exactly after kill -9 and refuse foreign checkpoints, two gloo processes match one,
distillation resumes, and an exported (int8) drafter loads and decodes losslessly."""

import collections
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import orthrus
from orthrus.cache import KVCache
from orthrus.checkpoint import load_model
from orthrus.errors import OrthrusError
from orthrus.training.data import draw_anchors, pack, read_shards, shard_files
from orthrus.training.distill import distill, write_shard
from orthrus.training.trainer import (CHANCE_TEMPERATURES, TrainConfig, ar_mask, diffusion_mask_mod, draft_loss, dual_pass,
                                      fit_temperatures, position_weights, prepare_model, split_attention, train, visible_ar_keys,
                                      walk_anchors)

from .conftest import write_random_model

# A small vocabulary keeps the tests fast; the mask id is the first id past the Qwen3 tokenizer (151669),
# outside this vocabulary, so the mask is a learned embedding, as for SmolLM2.
VOCAB, MASK_ID = 4096, 151669


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("llama"), "llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """Fake distilled rows: random prompts and replies (what matters here is the mechanics)."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = [{"index": i, "source": "chat", "tokens": [rng.randrange(2000) for _ in range(rng.randrange(30, 90))],
             "prompt_len": rng.randrange(5, 20), "finish": "stop"} for i in range(240)]
    write_shard(folder, rows[:120])
    write_shard(folder, rows[120:])
    return folder


def trained_model(folder, seed=1):
    """A model whose twins differ from the AR weights, as after training."""
    model, _ = load_model(folder, mask_token_id=MASK_ID)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.twin_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def inference_draft(model, tokens, anchor, block):
    """The engine's draft pass: cache holds tokens[:anchor], block [tokens[anchor], MASK...]."""
    cache = KVCache(model.config, 1, anchor + block, torch.float32, "cpu")
    window = cache.window(torch.tensor([0]), anchor, bidirectional=False)
    model(torch.tensor([tokens[:anchor]]), window.positions, window, "ar", logits=False)
    cache.lengths[0] = anchor
    ids = torch.full((1, block), model.mask_token_id)
    ids[0, 0] = tokens[anchor]
    window = cache.window(torch.tensor([0]), block, bidirectional=True)
    return model(ids, window.positions, window, "diffusion")[0, :-1]


def test_training_pass_gives_the_inference_draft_logits(llama_folder):
    model = trained_model(llama_folder)
    block = 8
    rng = random.Random(1)
    first = [rng.randrange(2000) for _ in range(40)]
    second = [rng.randrange(2000) for _ in range(50)]
    rows = pack([{"index": 0, "tokens": first, "prompt_len": 5}, {"index": 1, "tokens": second, "prompt_len": 5}], 96)
    assert rows.tokens.shape == (1, 96) and rows.doc[0, 40].item() == 1 and rows.positions[0, 40].item() == 0
    # anchors in both conversations (40 + 17 is position 17 of the second, which must not see the
    # first); the blocks at 36 and 40 + 45 run past the end of their conversation
    anchors = torch.tensor([[6, 36, 40 + 17, 40 + 45]])
    with torch.no_grad():
        student, teacher, ok = dual_pass(model, rows, anchors, block)
    for b, (tokens, a) in enumerate([(first, 6), (first, 36), (second, 17), (second, 45)]):
        expected = inference_draft(model, tokens, a, block)
        torch.testing.assert_close(model.lm_head(student[0, b]), expected, atol=2e-5, rtol=1e-5)
        with torch.no_grad():  # the teacher rows are the AR distribution at a .. a+B-2
            ar = model(torch.tensor([tokens]), torch.arange(len(tokens))[None], type("S", (), {
                "mask": torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril(), "update": lambda s, l, k, v: (k, v)})(), "ar")
        n = min(block - 1, len(tokens) - a)
        torch.testing.assert_close(model.lm_head(teacher[0, b, :n]), ar[0, a : a + n], atol=2e-5, rtol=1e-5)
    # a target is valid only inside its own conversation's reply
    assert ok[0, 0].all() and ok[0, 2].all()
    assert ok[0, 1].tolist() == [True] * 3 + [False] * 4 and ok[0, 3].tolist() == [True] * 4 + [False] * 3


def test_block_queries_see_their_anchors_past_and_their_own_block():
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    anchors = torch.tensor([[2, 6]])  # 2 blocks of 2 queries
    ar = visible_ar_keys(doc, anchors, 2)[0]
    assert ar[:2].tolist() == [[True, True, False, False, False, False, False, False]] * 2
    assert ar[2:].tolist() == [[False, False, False, False, True, True, False, False]] * 2
    assert ar_mask(doc)[0, 0, 5].tolist() == [False, False, False, False, True, True, False, False]
    # the attention over those keys and the block's own, against SDPA with the whole mask (8 AR + 4 block keys)
    mask_mod = diffusion_mask_mod(doc, anchors, 2)
    whole = mask_mod(torch.arange(1)[:, None, None], None, torch.arange(4)[None, :, None], torch.arange(12)[None, None, :])
    assert whole[0, :, 8:].tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2
    torch.manual_seed(0)
    q, k_ar, v_ar, k_block, v_block = torch.randn(1, 6, 4, 8), *torch.randn(2, 1, 2, 8, 8), *torch.randn(2, 1, 2, 4, 8)
    split = split_attention(q, (k_ar, k_block), (v_ar, v_block), visible_ar_keys(doc, anchors, 2), 2)
    dense = F.scaled_dot_product_attention(q, torch.cat([k_ar, k_block], 2), torch.cat([v_ar, v_block], 2),
                                           attn_mask=whole[:, None], enable_gqa=True)
    torch.testing.assert_close(split, dense)


def test_walk_anchors_are_where_greedy_decoding_puts_them(llama_folder):
    """On a reply the engine decoded (greedy, the drafter alone), the walk starts at the last prompt
    token, visits the engine's anchors and accepts in each cycle what the engine accepted."""
    from orthrus.engine import Engine, Sequence

    model = trained_model(llama_folder)
    model.config.block_size = 4
    prompt = [random.Random(2).randrange(2000) for _ in range(12)]
    engine = Engine(model, 1, 128, block_size=4, sources=("diffusion",))
    seq = Sequence(prompt, max_new_tokens=60)
    engine.add(seq)
    while engine.has_work():
        engine.step()
    rows = pack([{"index": 0, "tokens": prompt + seq.generated, "prompt_len": len(prompt)}], 96)
    anchors, valid, accepted = walk_anchors(model, rows, 4)
    walk, taken = anchors[0][valid[0]].tolist(), accepted[0][valid[0]].tolist()
    assert sum(seq.stats.accepted) > 0  # drafts were accepted: the walk has strides to follow
    assert taken[:-1] == seq.stats.accepted[: len(taken) - 1]  # the last cycle is cut by the token budget
    assert walk[0] == len(prompt) - 1 and all(b == a + k + 1 for a, k, b in zip(walk, taken, walk[1:]))
    capped, _, _ = walk_anchors(model, rows, 4, count=5, seed=3, row_ids=[0])
    assert set(capped[0].tolist()) <= set(walk) and len(capped[0]) == 5


def test_anchors_lie_in_replies_without_repeats_and_depend_only_on_the_row(data_folder):
    rows = pack(read_shards(data_folder), 128)
    anchors, valid = draw_anchors(rows, 16, 8, seed=3, row_ids=list(range(len(rows))))
    for i in range(len(rows)):
        a = anchors[i][valid[i]]
        assert len(set(a.tolist())) == len(a) > 0
        assert rows.assistant[i, a + 1].all() and (rows.doc[i, a + 1] == rows.doc[i, a]).all()
    again, _ = draw_anchors(rows.select([5, 2]), 16, 8, seed=3, row_ids=[5, 2])
    assert torch.equal(again, anchors[[5, 2]])


def test_only_the_twins_and_the_mask_embedding_get_gradients(llama_folder, data_folder):
    model = trained_model(llama_folder)
    prepare_model(model)
    rows = pack(read_shards(data_folder), 128).select([0, 1])
    anchors, valid = draw_anchors(rows, 8, 8, seed=0, row_ids=[0, 1])
    student, teacher, ok = dual_pass(model, rows, anchors, 8)
    draft_loss(model, student, teacher, ok & valid[:, :, None], "kl").backward()
    twins = {n for n, _ in model.twin_parameters()}
    assert "model.mask_embedding" in twins and len(twins) == 2 * 4 + 1
    for name, p in model.named_parameters():
        if name in twins:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_the_chunked_head_loss_and_its_gradient_are_the_plain_ones(kind, monkeypatch):
    """`HeadLoss` (chunks of rows, the gradient formed in the forward pass) against autograd through
    the whole logits, rows weighed, more rows than a chunk."""
    from orthrus.training import trainer

    monkeypatch.setattr(trainer, "LOSS_CHUNK", 5)
    g = torch.Generator().manual_seed(0)
    head, teacher = torch.randn(300, 16, generator=g), torch.randn(13, 16, generator=g)
    student, weights = torch.randn(13, 16, generator=g, requires_grad=True), torch.rand(13, generator=g)
    loss = trainer.HeadLoss.apply(student, teacher, head, weights, kind)
    loss.backward()
    fused = student.grad.clone()
    student.grad = None
    q_logp, p_logp = F.log_softmax(student @ head.T, -1), F.log_softmax(teacher @ head.T, -1)
    per_row = (F.nll_loss(q_logp, p_logp.argmax(-1), reduction="none") if kind == "ce"
               else (p_logp.exp() * (p_logp - q_logp)).sum(-1))
    plain = (per_row * weights).sum()
    plain.backward()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(fused, student.grad)


def test_position_decay_weighs_each_block_row_by_its_weight(llama_folder, data_folder):
    model = trained_model(llama_folder)
    rows = pack(read_shards(data_folder), 128).select([0, 1])
    anchors, valid = draw_anchors(rows, 8, 8, seed=0, row_ids=[0, 1])
    with torch.no_grad():
        student, teacher, ok = dual_pass(model, rows, anchors, 8)
    ok &= valid[:, :, None]
    weights = position_weights(8, 1.5)
    assert weights[0] == 1 and torch.allclose(weights[1:] / weights[:-1], torch.tensor(2 / 3).exp().reciprocal().expand(6))
    assert torch.equal(position_weights(8, 0), torch.ones(7))
    assert torch.allclose(position_weights(8, -1.5), weights.flip(0) / weights[-1])  # later rows up
    for kind in ("kl", "ce"):
        by_row = [draft_loss(model, student, teacher, ok & (torch.arange(7) == j), kind) for j in range(7)]
        assert all(x > 0 for x in by_row)
        expected = sum(w * x for w, x in zip(weights.tolist(), by_row))
        assert torch.allclose(draft_loss(model, student, teacher, ok, kind, weights), expected, rtol=1e-5)


def run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "orthrus", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def train_args(llama_folder, data_folder, run, *extra):
    return ["--model", str(llama_folder), "--data", str(data_folder), "--run-dir", str(run), "--block-size", "8",
            "--seq-len", "128", "--anchors", "8", "--batch", "2", "--grad-accum", "2", "--steps", "5", "--eval-every", "0",
            "--log-every", "1", "--threads", "1", *extra]


def final_twins(run):
    from safetensors.torch import load_file

    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(str(latest / "twins.safetensors")), json.loads((latest / "state.json").read_text())


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_after_kill_9_repeats_the_uninterrupted_run(llama_folder, data_folder, tmp_path):
    straight = run_cli(train_args(llama_folder, data_folder, tmp_path / "straight"))
    killed_run = tmp_path / "killed"
    proc = run_cli(train_args(llama_folder, data_folder, killed_run, "--checkpoint-minutes", "0"))
    deadline = time.time() + 120
    while not (killed_run / "checkpoints" / "step-00000002" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, state = final_twins(killed_run)
    assert 2 <= state["step"] < 5  # killed mid-run
    resumed = run_cli(train_args(llama_folder, data_folder, killed_run))
    assert resumed.wait(120) == 0 and straight.wait(120) == 0, resumed.stdout.read() + straight.stdout.read()
    a, sa = final_twins(tmp_path / "straight")
    b, sb = final_twins(killed_run)
    assert sa["step"] == sb["step"] == 5 and sa["cursor"] == sb["cursor"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(tmp_path / "straight") == losses(killed_run)
    assert (killed_run / "curves.png").stat().st_size > 1000


def test_resume_refuses_another_base_or_config(llama_folder, data_folder, tmp_path):
    cfg = TrainConfig(data=str(data_folder), model=str(llama_folder), block_size=8, seq_len=128, anchors=8, batch=2,
                      steps=3, eval_every=0)
    train(cfg, tmp_path / "run", device="cpu", stop_after=1)
    with pytest.raises(OrthrusError, match="block_size=8 \\(now 16\\)"):
        train(TrainConfig(**{**cfg.__dict__, "block_size": 16}), tmp_path / "run", device="cpu")
    # a checkpoint from before a setting existed ran with its default: it resumes so, and refuses another value
    latest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1] / "state.json"
    state = json.loads(latest.read_text())
    del state["config"]["position_decay"]
    latest.write_text(json.dumps(state))
    with pytest.raises(OrthrusError, match="position_decay=0.0 \\(now 1.5\\)"):
        train(TrainConfig(**{**cfg.__dict__, "position_decay": 1.5}), tmp_path / "run", device="cpu")
    assert train(cfg, tmp_path / "run", device="cpu", stop_after=1)["step"] == 2
    other = write_random_model(tmp_path / "other", "llama", seed=5, vocab_size=VOCAB)
    with pytest.raises(OrthrusError, match="fingerprint"):
        train(TrainConfig(**{**cfg.__dict__, "model": str(other)}), tmp_path / "run", device="cpu")


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(llama_folder, data_folder, tmp_path):
    """DDP over the twins, and FSDP2 sharding the whole model, each on 2 CPU processes (gloo), in fp32
    (bf16 rounds sums of a different grouping differently)."""
    one = run_cli(train_args(llama_folder, data_folder, tmp_path / "one", "--steps", "2", "--dtype", "fp32"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = {}
    for parallel in ("ddp", "fsdp"):
        args = train_args(llama_folder, data_folder, tmp_path / parallel, "--steps", "2", "--batch", "1", "--parallel", parallel,
                          "--dtype", "fp32")
        launched[parallel] = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                               "2", "-m", "orthrus", "train", *args], env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)
    assert one.wait(180) == 0, one.stdout.read()
    reference, ref_twins = losses(tmp_path / "one"), final_twins(tmp_path / "one")[0]
    assert len(reference) == 2
    for parallel, proc in launched.items():
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        assert losses(tmp_path / parallel) == pytest.approx(reference, abs=1e-5), parallel
        twins, _ = final_twins(tmp_path / parallel)
        for name in ref_twins:
            torch.testing.assert_close(twins[name], ref_twins[name], atol=1e-5, rtol=1e-4)

def test_export_int8_and_float_drafters_load_and_decode_losslessly(llama_folder, data_folder, tmp_path, capsys):
    from orthrus.training.trainer import export_drafter

    cfg = TrainConfig(data=str(data_folder), model=str(llama_folder), block_size=8, seq_len=128, anchors=8, batch=2,
                      steps=2, eval_every=0, lr=1e-2)
    train(cfg, tmp_path / "run", device="cpu")
    trained, _ = final_twins(tmp_path / "run")
    export_drafter(tmp_path / "run", tmp_path / "int8", storage="int8")
    export_drafter(tmp_path / "run", tmp_path / "float", storage="float", block_size=4, draft_vocab=50)
    sizes = {s: (tmp_path / s / "model.safetensors").stat().st_size for s in ("int8", "float")}
    assert sizes["int8"] < 0.6 * sizes["float"]
    base, _ = load_model(llama_folder, mask_token_id=MASK_ID)
    for storage in ("int8", "float"):
        llm = orthrus.load(str(llama_folder), drafter=str(tmp_path / storage), dtype="float32", device="cpu")
        assert llm.drafter_trained and llm.block_size == {"int8": 8, "float": 4}[storage]
        for name, want in trained.items():
            got = llm.model.get_parameter(name)
            if storage == "int8" and got.dim() == 2:  # half a quantisation step of the delta per row
                step = (want - base.get_parameter(name.replace("_diff.", "."))).abs().amax(1, keepdim=True) / 127
                assert ((got - want).abs() <= step / 2 + 1e-6).all(), name
            else:
                torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)  # bf16 storage
        prompt = [17, 99, 1234, 5, 77, 300]
        ar = llm.generate(prompt, max_new_tokens=12, mode="ar")
        assert llm.generate(prompt, max_new_tokens=12).token_ids == ar.token_ids
    # the float export drafts from the 50 tokens the data's replies use most, the stop tokens among them
    vocab = llm.model.draft_vocab.tolist()
    replies = collections.Counter(t for r in read_shards(data_folder) for t in r["tokens"][r["prompt_len"]:])
    stops = {t for t in llm.stop_token_ids if t < VOCAB}
    assert len(vocab) == 50 and vocab == sorted(vocab) and stops <= set(vocab)
    assert {t for t, _ in replies.most_common(40)} <= set(vocab)
    # a new run at another block size starts from the exported drafter (lr 0: the twins stay put)
    train(TrainConfig(**{**cfg.__dict__, "block_size": 4, "steps": 1, "lr": 0.0, "init_from": str(tmp_path / "float")}),
          tmp_path / "b4", device="cpu")
    started, state = final_twins(tmp_path / "b4")
    assert state["init_from"] == str(tmp_path / "float") and state["config"]["block_size"] == 4
    for name, want in started.items():
        assert torch.equal(want, llm.model.get_parameter(name)), name
    # its export counts what the drafter it started from had been trained on
    export_drafter(tmp_path / "b4", tmp_path / "b4-export", storage="float")
    first, second = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("float", "b4-export"))
    assert second["trained_steps"] == first["trained_steps"] + 1 == 3
    assert second["trained_tokens"] == first["trained_tokens"] + state["tokens"]
    # every export carries chance temperatures fit on the run's held-out rows, one per draft position
    for folder, block in (("int8", 8), ("float", 4), ("b4-export", 4)):
        temperatures = json.loads((tmp_path / folder / "config.json").read_text())["chance_temperatures"]
        assert len(temperatures) == block - 1 and set(temperatures) <= set(CHANCE_TEMPERATURES), folder
    assert llm.model.chance_temperatures == tuple(first["chance_temperatures"])
    # a run whose data is gone still exports, without them, and says so
    latest = max((tmp_path / "run" / "checkpoints").iterdir())
    state = json.loads((latest / "state.json").read_text())
    state["config"]["data"] = str(tmp_path / "moved-away")
    (latest / "state.json").write_text(json.dumps(state))
    export_drafter(tmp_path / "run", tmp_path / "no-data", storage="int8")
    assert "chance_temperatures" not in json.loads((tmp_path / "no-data" / "config.json").read_text())
    assert "exported without chance temperatures" in capsys.readouterr().err


def test_chance_temperatures_are_the_ones_the_outcomes_follow():
    """Drafts right with probability softmax(logits / t_j) of the drafted token, t = 0.3 / 0.8 / 1.5: the
    fit finds each position's t, counting a position only where the drafts before it were right."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6000, 3, 20, generator=gen) * 2
    truth = torch.tensor([0.3, 0.8, 1.5])
    chance = (logits / truth[:, None]).softmax(-1).amax(-1)
    right = torch.rand(6000, 3, generator=gen) < chance
    fitted = fit_temperatures(zip(logits.split(1000), right.split(1000)))
    assert fitted == pytest.approx(truth.tolist(), abs=0.1)
    reached_only = right.clone()
    reached_only[~right[:, 0], 1:] = True  # past a wrong first draft nothing counts, whatever it holds
    assert fit_temperatures([(logits, reached_only)]) == fitted
    with pytest.raises(OrthrusError, match="no draft blocks"):
        fit_temperatures([])


def test_bf16_training_step_keeps_fp32_master_twins(llama_folder, data_folder, tmp_path):
    cfg = TrainConfig(data=str(data_folder), model=str(llama_folder), block_size=8, seq_len=128, anchors=4, batch=1,
                      steps=1, eval_every=0, dtype="bf16")
    train(cfg, tmp_path / "run", device="cpu")
    twins, state = final_twins(tmp_path / "run")
    base, _ = load_model(llama_folder, mask_token_id=MASK_ID)
    assert state["step"] == 1 and all(t.dtype == torch.float32 for t in twins.values())
    moved = [n for n, t in twins.items() if not torch.equal(t, base.get_parameter(n.replace("_diff.", ".")))
             and n != "model.mask_embedding"]
    assert len(moved) == len(twins) - 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()))


def test_a_run_on_walk_anchors_trains_and_reports_acceptance_on_decodings_anchors(llama_folder, data_folder, tmp_path):
    cfg = TrainConfig(data=str(data_folder), model=str(llama_folder), block_size=4, seq_len=128, anchors=6, batch=1,
                      steps=2, eval_every=2, eval_rows=2, log_every=1, walk_anchors=True)
    train(cfg, tmp_path / "run", device="cpu")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all(r["tokens"] > 0 for r in records if "loss" in r)
    evals = [r for r in records if "walk_acceptance" in r]
    assert len(evals) == 1 and 1.0 <= evals[0]["walk_acceptance"] <= 4.0
    with pytest.raises(OrthrusError, match="walk_anchors"):  # a run keeps the anchors it started with
        train(replace(cfg, walk_anchors=False, steps=3), tmp_path / "run", device="cpu")


def test_prompt_mix_never_repeats_a_prompt(monkeypatch):
    from orthrus.training import data

    monkeypatch.setattr(data, "sharegpt_prompts", lambda seed: ["a", "b"])
    monkeypatch.setattr(data, "code_prompts", lambda seed: ["A", "B", "C", "D", "E"])
    prompts = data.prompt_mix({"chat": 1, "code": 1}, 0, 8)
    assert prompts == [("chat", "a"), ("code", "A"), ("chat", "b"), ("code", "B"), None, ("code", "C"), None, ("code", "D")]
    assert data.prompt_mix({"chat": 1, "code": 1}, 0, 4) == prompts[:4]  # the same prompt at an index, whatever the count


def test_a_training_mix_weighs_each_source_rows_and_leaves_held_out_rows_alone(tmp_path):
    from orthrus.training.trainer import TrainConfig, epoch_rows, eval_set

    rows = [{"index": i, "source": ("chat", "math", "code")[i % 3], "tokens": [i + 1] * 10, "prompt_len": 2, "finish": "stop"}
            for i in range(60)]
    write_shard(tmp_path, rows)
    files = [p.name for p in shard_files(tmp_path)]

    def tokens_by_source(cfg):
        packed, order = epoch_rows(cfg, files, 0)
        assert sorted(order.tolist()) == list(range(len(packed)))
        seen = packed.tokens[packed.assistant].tolist()  # reply tokens: each row's index + 1, 8 of them a copy
        return {src: sum(seen.count(r["index"] + 1) for r in rows if r["source"] == src) // 8 for src in ("chat", "math", "code")}

    plain = tokens_by_source(TrainConfig(data=str(tmp_path), seq_len=64))
    assert plain == {"chat": 19, "math": 20, "code": 20}  # the training rows (row 0 is held out), once each
    assert tokens_by_source(TrainConfig(data=str(tmp_path), seq_len=64, mix="chat:3,code:0")) == {"chat": 57, "math": 20, "code": 0}
    held = eval_set(TrainConfig(data=str(tmp_path), seq_len=64, eval_rows=99), files)
    assert held.tokens.shape == eval_set(TrainConfig(data=str(tmp_path), seq_len=64, eval_rows=99, mix="chat:3,code:0"), files).tokens.shape
    with pytest.raises(OrthrusError, match="leaves no training rows"):
        epoch_rows(TrainConfig(data=str(tmp_path), seq_len=64, mix="chat:0,math:0,code:0"), files, 0)


def test_distill_answers_chat_messages_and_skips_a_used_up_source(qwen3, tmp_path, monkeypatch):
    from orthrus.training import data

    followup = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Say bye."}]
    monkeypatch.setattr(data, "sharegpt_prompts", lambda seed: ["Say hi.", followup])
    assert distill(qwen3, tmp_path, 6, {"chat": 1, "code": 1}, rows=2, max_new_tokens=2, progress=False) == 5
    rows = read_shards(tmp_path)
    assert [(r["index"], r["source"]) for r in rows] == [(0, "chat"), (1, "code"), (2, "chat"), (3, "code"), (5, "code")]
    assert rows[2]["tokens"][: rows[2]["prompt_len"]] == qwen3.encode(followup)  # the context, then the turn


def test_sharegpt_followups_are_two_turn_chats_after_the_first_turns():
    from orthrus.training.data import sharegpt_exchanges, sharegpt_followups, sharegpt_prompts

    firsts, followups = sharegpt_exchanges(0), sharegpt_followups(0)
    assert len(followups) > 1000 and all([m["role"] for m in chat] == ["user", "assistant", "user"] for chat in followups)
    assert sharegpt_prompts(0) == [prompt for prompt, _ in firsts] + followups  # first turns keep their slots


def test_distill_writes_the_models_own_replies_and_resumes(qwen3, tmp_path):
    from orthrus.training.data import prompt_mix

    mix = {"chat": 1, "math": 1, "code": 1}
    assert distill(qwen3, tmp_path, 4, mix, rows=2, max_new_tokens=6, flush_rows=2, progress=False) == 4
    assert distill(qwen3, tmp_path, 6, mix, rows=2, max_new_tokens=6, flush_rows=2, progress=False) == 2
    rows = read_shards(tmp_path)
    assert [r["index"] for r in rows] == list(range(6)) and [r["source"] for r in rows[:3]] == ["chat", "math", "code"]
    prompts = prompt_mix(mix, 0, 6)
    for r in rows:
        ids = qwen3.encode([{"role": "user", "content": prompts[r["index"]][1]}])
        assert r["tokens"][: r["prompt_len"]] == ids
        assert r["tokens"][r["prompt_len"] :] == qwen3.generate(ids, max_new_tokens=6, mode="ar").token_ids
    # shards are gzipped; a plain shard (data written before) reads the same, and distilling goes on past it
    assert [p.name for p in shard_files(tmp_path)] == [f"shard-{i:05d}.jsonl.gz" for i in range(3)]
    first = shard_files(tmp_path)[0]
    first.with_name(first.name.removesuffix(".gz")).write_bytes(gzip.decompress(first.read_bytes()))
    first.unlink()
    assert read_shards(tmp_path) == rows
    assert distill(qwen3, tmp_path, 8, mix, rows=2, max_new_tokens=6, flush_rows=2, progress=False) == 2
    assert [r["index"] for r in read_shards(tmp_path)] == list(range(8)) and len(shard_files(tmp_path)) == 4
    with pytest.raises(OrthrusError, match="other settings"):
        distill(qwen3, tmp_path, 6, mix, rows=2, max_new_tokens=7, progress=False)


def test_text_data_is_sharegpt_replies_made_the_same_on_every_machine(qwen3, tmp_path):
    """`distill --from-text`: no generation, so a lost folder is remade bit for bit by the same command."""
    from orthrus.training.data import sharegpt_exchanges
    from orthrus.training.distill import write_text_data

    assert write_text_data(qwen3, tmp_path / "a", 12, max_new_tokens=40, shard_rows=5) == 12
    assert write_text_data(qwen3, tmp_path / "a", 15, max_new_tokens=40, shard_rows=5) == 3  # grows, keeps what exists
    assert write_text_data(qwen3, tmp_path / "b", 15, max_new_tokens=40) == 15
    rows = read_shards(tmp_path / "a")
    assert rows == read_shards(tmp_path / "b") and len({r["index"] for r in rows}) == 15
    exchanges = sharegpt_exchanges(0)
    eos = qwen3.tokenizer.eos_token_id
    for r in rows:
        prompt, reply = exchanges[r["index"]]
        assert r["source"] == "chat-text" and r["tokens"][: r["prompt_len"]] == qwen3.encode([{"role": "user", "content": prompt}])
        answer = qwen3.tokenizer.encode(reply, add_special_tokens=False) + [eos]
        assert r["tokens"][r["prompt_len"] :] == answer[:40] and r["finish"] == ("stop" if len(answer) <= 40 else "length")
    assert len(pack(rows, 128)) > 0
    with pytest.raises(OrthrusError, match="other settings"):
        write_text_data(qwen3, tmp_path / "a", 15, max_new_tokens=41)


def test_flex_attention_pass_agrees_with_the_split_pass(llama_folder, data_folder):
    """The block-sparse FlexAttention path (used on CUDA) gives the split path's drafts."""
    model = trained_model(llama_folder)
    rows = pack(read_shards(data_folder), 128).select([0, 1])
    anchors, _ = draw_anchors(rows, 8, 8, seed=0, row_ids=[0, 1])
    with torch.no_grad():
        split, teacher, ok = dual_pass(model, rows, anchors, 8, flex=False)
        sparse, teacher2, ok2 = dual_pass(model, rows, anchors, 8, flex=True)
    torch.testing.assert_close(sparse, split, atol=1e-5, rtol=1e-5)
    assert torch.equal(teacher, teacher2) and torch.equal(ok, ok2)


def test_acceptance_trend_fits_the_fixed_held_out_evaluations_and_extrapolates_to_the_targets():
    from orthrus.training.trainer import acceptance_trend

    records = [{"step": 5, "loss": 1.0, "tokens": 500}, {"step": 5, "acceptance": 9.0, "eval_blocks": 32}]  # smaller held-out set: ignored
    for i, step in enumerate((10, 20, 40, 80)):
        tokens = 1000 * 2 ** i
        records += [{"step": step, "loss": 1.0, "tokens": tokens},
                    {"step": step, "acceptance": 2.0 + 0.25 * i, "eval_blocks": 64}]
    trend = acceptance_trend(records, targets=(3.0, 4.0))
    assert trend["evaluations"] == 4 and trend["per_doubling"] == pytest.approx(0.25)
    assert trend["tokens_to_reach"][3.0] == pytest.approx(16_000) and trend["tokens_to_reach"][4.0] == pytest.approx(256_000)
    falling = [dict(r, acceptance=3.0 - r["acceptance"] / 10) if "acceptance" in r else r for r in records]
    assert acceptance_trend(falling)["tokens_to_reach"] == {3.0: None, 4.0: None}
    # a line that barely rises reaches the targets past any float (once an OverflowError that ended a run)
    flat = [dict(r, acceptance=2.0 + 1e-6 * r["step"]) if "acceptance" in r else r for r in records]
    assert acceptance_trend(flat)["tokens_to_reach"] == {3.0: None, 4.0: None}
    assert acceptance_trend(records[:4]) is None


def test_a_run_starts_on_an_empty_cache_from_what_the_repo_holds(smollm2_folder, tmp_path, monkeypatch):
    """A new machine: no distilled data, no runs. One command remakes the data (ShareGPT text), the
    shipped drafter starts the run, a step trains, and the export decodes exactly."""
    from orthrus.hub import DEFAULT_DRAFTER
    from orthrus.training.distill import write_text_data
    from orthrus.training.trainer import export_drafter

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))
    llm = orthrus.load(str(smollm2_folder), drafter="none", dtype="float32", device="cpu")
    write_text_data(llm, tmp_path / "cache" / "distill" / "text", 200, max_new_tokens=64)
    cfg = TrainConfig(data=str(tmp_path / "cache" / "distill" / "text"), model=str(smollm2_folder), block_size=4,
                      seq_len=128, anchors=8, batch=1, steps=1, eval_every=0, init_from=str(DEFAULT_DRAFTER))
    state = train(cfg, tmp_path / "cache" / "runs" / "b4", device="cpu")
    shipped = json.loads((DEFAULT_DRAFTER / "config.json").read_text())
    assert state["step"] == 1 and state["init_trained"] == {"steps": shipped["trained_steps"], "tokens": shipped["trained_tokens"]}
    twins, _ = final_twins(tmp_path / "cache" / "runs" / "b4")
    start = orthrus.load(str(smollm2_folder), drafter=str(DEFAULT_DRAFTER), dtype="float32", device="cpu")
    # one AdamW step from the shipped twins: every weight within about lr of where it started, most moved
    assert all(float((t - start.model.get_parameter(n)).abs().max()) <= 1.5 * cfg.lr for n, t in twins.items())
    assert sum(not torch.equal(t, start.model.get_parameter(n)) for n, t in twins.items()) > len(twins) // 2
    export_drafter(tmp_path / "cache" / "runs" / "b4", tmp_path / "export", storage="int8")
    mine = orthrus.load(str(smollm2_folder), drafter=str(tmp_path / "export"), dtype="float32", device="cpu")
    prompt = [{"role": "user", "content": "Name three colours."}]
    assert mine.generate(prompt, max_new_tokens=16).token_ids == llm.generate(prompt, max_new_tokens=16, mode="ar").token_ids
    # the model's own replies are in the repo: a run trains on them as they are
    repo_data = Path(__file__).parents[1] / "data" / "distill" / "smollm2"
    before = len(shard_files(repo_data))  # a distillation running beside the tests may add shards meanwhile
    self_run = train(TrainConfig(**{**cfg.__dict__, "data": str(repo_data)}), tmp_path / "cache" / "runs" / "b4-self", device="cpu")
    assert self_run["step"] == 1 and 0 < before <= len(self_run["files"]) <= len(shard_files(repo_data))
    repo_rows = read_shards(repo_data)
    assert len(repo_rows) == len({r["index"] for r in repo_rows}) >= 500


def test_auto_precision_trains_in_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    from orthrus.training import trainer

    cpu = torch.device("cpu")
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer, "native_bf16", lambda device, native=native: native)
        assert trainer.train_dtype("auto", cpu) == want
        assert trainer.train_dtype("fp32", cpu) == "fp32" and trainer.train_dtype("bf16", cpu) == "bf16"
