"""Every script in examples/ runs offline on a tiny random model, checks itself against uncached generation where it
can (``--check``), and shows reuse.

The scripts run in this process (``runpy``, as ``__main__``) to spare the start-up of a Python with torch for each;
the reload half of save_and_reload runs in a new process, as after a restart."""

from __future__ import annotations

import io
import os
import re
import runpy
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_example(name: str, *args: str, stdin: str = "") -> str:
    """Run an example as ``__main__`` in this process; returns what it printed (a failed check raises SystemExit)."""
    argv, stdin_before = sys.argv, sys.stdin
    sys.argv, sys.stdin = [str(EXAMPLES / name), *args], io.StringIO(stdin)
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv, sys.stdin = argv, stdin_before
    return printed.getvalue()


def run_example_in_new_process(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def restored_counts(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) restored", output)]


def test_every_example_is_tested():
    tested = {"quickstart.py", "chat.py", "shared_prompt.py", "agent_loop.py", "pipeline_chat.py",
              "save_and_reload.py", "batched_fewshot.py", "threads.py"}
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_batched_fewshot():
    output = run_example("batched_fewshot.py", "--batches", "2", "--batch-size", "3", "--max-new-tokens", "3", "--check")
    first, second = [[int(n) for n in re.findall(r"\d+", line.split("[")[1])]
                     for line in output.splitlines() if "restored per row" in line]
    assert first[0] == 0 and all(n > 100 for n in first[1:]), "later rows restore what the first computed"
    assert all(n > 100 for n in second)


def test_threads():
    output = run_example("threads.py", "--threads", "3", "--turns", "2", "--max-new-tokens", "4", "--check")
    restored = restored_counts(output)
    assert len(restored) == 6 and sum(n > 0 for n in restored) >= 3  # every conversation's second turn reuses


def test_quickstart():
    output = run_example("quickstart.py", "--turns", "2", "--user-tokens", "8", "--max-new-tokens", "4")
    assert "identical output: True" in output and "identical output: False" not in output


def test_chat():
    output = run_example("chat.py", "--turns", "2", "--max-new-tokens", "6", "--check")
    first, second = restored_counts(output)
    assert first == 0 and second > 0


def test_chat_interactive_reads_stdin():
    output = run_example("chat.py", "--interactive", "--max-new-tokens", "4", stdin="first message\nsecond message\n\n")
    assert "user: second message" in output and restored_counts(output)[1] > 0


def test_shared_prompt():
    output = run_example("shared_prompt.py", "--questions", "4", "--max-new-tokens", "3", "--check")
    counts = restored_counts(output)
    assert counts[:2] == [0, 0] and all(n > 0 for n in counts[2:])  # the shared prefix hits from its 3rd use


def test_agent_loop():
    output = run_example("agent_loop.py", "--steps", "3", "--max-new-tokens", "4", "--check")
    counts = restored_counts(output)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > counts[1]  # the restored context grows


def test_pipeline_chat():
    output = run_example("pipeline_chat.py", "--sessions", "2", "--turns", "2", "--max-new-tokens", "4", "--check")
    assert restored_counts(output)[-1] > 0


def test_save_and_reload_across_processes(tmp_path):
    path = tmp_path / "cache.safetensors"
    first = run_example("save_and_reload.py", "--path", str(path), "--max-new-tokens", "4")
    assert path.is_file() and "identical to uncached" in first
    second = run_example_in_new_process("save_and_reload.py", "--path", str(path), "--load-only",
                                        "--max-new-tokens", "4")
    assert restored_counts(second)[-1] > 0 and "identical to uncached" in second


def test_local_model_path(tmp_path):
    """--model-path loads a local model directory and its tokenizer offline (here a tiny model saved to disk)."""
    from hf_marconi.pipeline import byte_level_tokenizer
    from hf_marconi.testing import build_model

    build_model("bamba").save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    output = run_example("chat.py", "--model-path", str(tmp_path), "--turns", "2", "--max-new-tokens", "4", "--check")
    assert restored_counts(output)[1] > 0
