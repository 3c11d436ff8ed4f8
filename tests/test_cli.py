"""The `orthrus` command: generate streams the same text as the API; user mistakes exit 2
with one clear line and no traceback."""

import subprocess
import sys

import pytest
import torch


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "orthrus", *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture
def qwen3_auto(request):
    """The model as `--dtype auto` loads it on this machine: bf16 where the CPU kernels run."""
    from orthrus import kernels

    return request.getfixturevalue("qwen3_bf16" if kernels.module() is not None else "qwen3")


def test_generate_matches_the_api(qwen3_folder, qwen3_auto):
    qwen3 = qwen3_auto
    out = run_cli("generate", "Say something", "--model", str(qwen3_folder), "--drafter", "none", "--max-new-tokens", "12",
                  "--block-size", "4", "--stats", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    expected = qwen3.generate([{"role": "user", "content": "Say something"}], max_new_tokens=12, mode="ar").text
    assert out.stdout == expected + "\n"
    assert "untrained twin copy" in out.stderr and "tokens/cycle" in out.stderr


def test_generate_reads_stdin_and_runs_ar_mode(qwen3_folder, qwen3_auto):
    qwen3 = qwen3_auto
    out = run_cli("generate", "-", "--raw", "--model", str(qwen3_folder), "--mode", "ar", "--max-new-tokens", "8", stdin="Hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == qwen3.generate("Hello", max_new_tokens=8, mode="ar").text + "\n"


def test_chat_keeps_history(qwen3_folder):
    out = run_cli("chat", "--model", str(qwen3_folder), "--drafter", "none", "--max-new-tokens", "6", stdin="Hi\nAnd again\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") == 3


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder"], "no such model folder"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--max-new-tokens", "100000"], "exceeds the context"),
    (["--dtype", "float64"], "dtype must be one of"),
    (["--drafter", "/no/drafter"], "no such drafter folder"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_user_mistakes_exit_2_with_one_clear_line(qwen3_folder, args, message):
    if "--model" not in args:
        args = ["--model", str(qwen3_folder), *args]
    out = run_cli("generate", "hello", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_calibrate_measures_again_and_keeps_what_it_shows(qwen3_folder, tmp_path, monkeypatch, capsys):
    """`orthrus calibrate` re-measures (even with costs on file) and writes what it prints to the
    file the planner reads."""
    import re

    from pathlib import Path

    from orthrus import cli, kernels
    from orthrus.api import read_pass_costs

    (tmp_path / "kernels").symlink_to(kernels.cache_dir(), target_is_directory=True)  # no rebuild of the kernels
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))
    args = ["calibrate", "--model", str(qwen3_folder), "--drafter", "none", "--dtype", "float32", "--device", "cpu",
            "--block-size", "4"]
    shown, kept = [], []
    for _ in range(2):
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        path = re.search(r"kept in (\S+\.json)", out)[1]
        shown.append([float(ms) for ms in re.findall(r"^\| (?:verify|draft)[^|]*\| ([\d.]+) \|", out, re.M)])
        kept.append(read_pass_costs(Path(path)))
    for costs, ms in zip(kept, shown):
        assert len(ms) == len(costs.verify) and ms == [round(s * 1e3, 1) for s in (*costs.verify[1:], costs.draft)]
    assert kept[0] != kept[1]  # measured again, not read back
