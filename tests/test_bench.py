"""`orthrus bench` end to end on the tiny random Qwen3 (every method, two prompt sets), and the
prompt-set loaders."""

import json

from orthrus.engine import MAX_LOOKUP_DRAFTS

import pytest

from orthrus.bench import GSM_EVAL_SEED, load_prompt_set
from orthrus.bench.prompts import gsm
from orthrus.cli import main
from orthrus.errors import OrthrusError

METHODS = ["orthrus", "ar", "hf", "hf-pld"]


def test_bench_runs_every_method_and_writes_json_table_plots(qwen3_folder, tmp_path, capsys):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('"Name a river."\n{"messages": [{"role": "user", "content": "Count to five."}]}\n')
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(qwen3_folder), "--drafter", "none", "--dtype", "float32", "--device", "cpu",
               "--sets", f"{prompts},gsm", "--num-prompts", "2", "--max-new-tokens", "8", "--block-size", "4", "--draft-confidence", "0.3",
               "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["draft_confidence"] == 0.3 and result["config"]["block_size"] == 4
    assert list(result["summary"]) == ["mine", "gsm"]
    runs = result["runs"]
    assert len(runs) == 2 * 2 * len(METHODS)
    for name, s in result["summary"].items():
        assert s["prompts"] == 2 and list(s["methods"]) == METHODS
        m = s["methods"]
        assert m["orthrus"]["exact_match_vs_ar"] == 1.0  # greedy fp32: lossless
        assert m["hf"]["exact_match_vs_ar"] == 1.0  # same weights, same stop rule, same token count
        assert m["ar"]["tokens_per_forward"] == 1.0 and m["hf"]["tokens_per_forward"] == 1.0
        o = m["orthrus"]
        assert 1.0 <= o["acceptance_length"] <= 1 + MAX_LOOKUP_DRAFTS
        assert 0 < o["tokens_per_forward"] <= o["acceptance_length"] + 1e-9  # one or two forwards a cycle, by source
        assert sum(src["cycles"] for src in o["acceptance_length_by_source"].values()) == o["cycles"]
        assert len(o["position_acceptance"]) == 3
        assert o["position_acceptance"] == sorted(o["position_acceptance"], reverse=True)
        assert sum(o["acceptance_length_histogram"].values()) == o["cycles"]
        assert m["ar"]["speedup_vs_ar"] == 1.0 and m["hf"]["speedup_vs_hf"] == 1.0
        mine = [r for r in runs if r["set"] == name]
        assert all(1 <= len(r["token_ids"]) <= 8 and r["seconds"] > 0 for r in mine)
        assert o["tokens"] == sum(len(r["token_ids"]) for r in mine if r["method"] == "orthrus")
    table = (out / "bench.md").read_text()
    assert table.count("\n| mine (2) |") == len(METHODS) and table.count("\n| gsm (2) |") == len(METHODS)
    assert table in capsys.readouterr().out
    for png in ("position_acceptance.png", "acceptance_length_histogram.png", "speedup.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_passes_top_k_and_top_p_to_every_method(qwen3_folder, tmp_path, capsys):
    # top-k 1 leaves each method one token to sample: all must give the greedy tokens, so a method
    # that dropped top_k (sampling at temperature 2 from the whole vocabulary) would not match
    out = tmp_path / "out"
    base = ["bench", "--model", str(qwen3_folder), "--drafter", "none", "--dtype", "float32", "--device", "cpu",
            "--sets", "gsm", "--num-prompts", "2", "--max-new-tokens", "8", "--out", str(out)]
    assert main(base + ["--methods", "orthrus,ar,hf", "--temperature", "2", "--top-k", "1", "--top-p", "0.9"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert (result["config"]["temperature"], result["config"]["top_k"], result["config"]["top_p"]) == (2.0, 1, 0.9)
    greedy = tmp_path / "greedy"
    assert main(base[:-1] + [str(greedy), "--methods", "ar"]) == 0
    want = [r["token_ids"] for r in json.loads((greedy / "bench.json").read_text())["runs"]]
    for method in ("orthrus", "ar", "hf"):
        assert [r["token_ids"] for r in result["runs"] if r["method"] == method] == want, method
    capsys.readouterr()
    assert main(base + ["--methods", "ar", "--temperature", "0.7", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_repeats_keep_each_methods_fastest_run_of_a_prompt(monkeypatch):
    from orthrus.bench.prompts import PromptSet
    from orthrus.bench.runner import Runner

    class Encoder:
        def encode(self, prompt):
            return [len(prompt)]

    times = iter([3.0, 5.0, 1.0, 6.0, 2.0, 4.0])  # orthrus, ar, then ar, orthrus (turns rotate), then orthrus, ar
    calls = []

    def run_one(self, method, ids, max_new_tokens, seed):
        calls.append(method)
        return [7], next(times), 1, [], [], []

    monkeypatch.setattr(Runner, "run_one", run_one)
    monkeypatch.setattr(Runner, "warm_up", lambda self, ids: None)
    runner = Runner(Encoder(), None, ["orthrus", "ar"], repeats=3)
    runs = runner.run([PromptSet("mine", ["a prompt"])])
    assert calls == ["orthrus", "ar", "ar", "orthrus", "orthrus", "ar"]
    assert [(r.method, r.seconds) for r in runs] == [("orthrus", 2.0), ("ar", 1.0)]
    with pytest.raises(OrthrusError, match="repeats"):
        Runner(Encoder(), None, ["ar"], repeats=0)


def test_bench_rejects_unknown_method_and_set(qwen3_folder, tmp_path, capsys):
    base = ["bench", "--model", str(qwen3_folder), "--drafter", "none", "--out", str(tmp_path)]
    assert main(base + ["--methods", "orthrus,vllm", "--sets", "gsm", "--num-prompts", "1"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(base + ["--sets", "mmlu"]) == 2
    assert "unknown prompt set 'mmlu'" in capsys.readouterr().err
    # llama.cpp needs the model as a GGUF: a folder model without --gguf is refused up front, in one line
    assert main(base + ["--methods", "ar,llama.cpp", "--sets", "gsm", "--num-prompts", "1"]) == 2
    assert "give --gguf PATH" in capsys.readouterr().err
    assert main(base + ["--methods", "llama.cpp", "--gguf", str(tmp_path / "missing.gguf"), "--sets", "gsm",
                        "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "missing.gguf: no such GGUF file" in err or "needs llama-cpp-python" in err


def test_named_prompt_sets_load_and_gsm_eval_split_is_fixed():
    for name in ("mtbench", "humaneval", "gsm"):
        ps = load_prompt_set(name, 3)
        assert len(ps.prompts) == 3
        assert all(p[0]["role"] == "user" and len(p[0]["content"]) > 20 for p in ps.prompts)
    assert load_prompt_set("gsm", 3).prompts == gsm(3, GSM_EVAL_SEED)
    assert gsm(3, GSM_EVAL_SEED + 1) != gsm(3, GSM_EVAL_SEED)


def test_jsonl_prompt_formats_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"plain"\n\n{"prompt": "a"}\n{"text": "b"}\n{"turns": ["first", "second"]}\n'
                 '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}\n')
    ps = load_prompt_set(str(f), 10)
    assert ps.name == "p"
    assert [p[-1]["content"] for p in ps.prompts] == ["plain", "a", "b", "first", "u"]
    assert len(load_prompt_set(str(f), 2).prompts) == 2
    f.write_text('"ok"\n{"prompt": 3}\n')
    with pytest.raises(OrthrusError, match=r"p.jsonl:2:"):
        load_prompt_set(str(f), 10)
    f.write_text('"ok"\nnot json\n')
    with pytest.raises(OrthrusError, match=r"p.jsonl:2:"):
        load_prompt_set(str(f), 10)
    with pytest.raises(OrthrusError, match="no such prompt file"):
        load_prompt_set(str(tmp_path / "missing.jsonl"), 10)
