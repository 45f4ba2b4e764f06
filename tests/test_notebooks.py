"""The notebooks in notebooks/ run top to bottom at their default settings (nbclient, python3
kernel) and print a plausible key number.

Each is executed from a copy in tmp_path, so nothing is written into notebooks/ (they are
committed with outputs cleared; `test_committed_without_outputs` checks that).
"""

import json
import math
import pathlib
import re
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # the python3 kernel the notebooks run on

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _execute(name: str, tmp_path) -> str:
    """Runs notebooks/<name> from a copy in tmp_path; returns all its text output. The
    kernel's TMPDIR is tmp_path: the workdirs the notebooks train into (`tempfile.mkdtemp`)
    go where pytest cleans up, not into the system's /tmp."""
    copy = tmp_path / name
    shutil.copy(ROOT / "notebooks" / name, copy)
    nb = nbformat.read(copy, as_version=4)
    # The notebooks find the repository from their working directory (train.py's parent).
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    with pytest.MonkeyPatch.context() as patch:  # the kernel inherits this environment
        patch.setenv("TMPDIR", str(tmp_path))
        client.execute()  # raises CellExecutionError naming the cell on any error
    nbformat.write(nb, copy)
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "text/plain" in out.get("data", {}):
                text.append(out["data"]["text/plain"])
    return "".join(text)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return float(match.group(1))


def test_all_notebooks_are_tested():
    assert {p.name for p in NOTEBOOKS} >= {"eval.ipynb", "kv_cache.ipynb",
                                           "load_balance.ipynb", "speculative.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None, path.name


@pytest.mark.slow
def test_eval_notebook(tmp_path):
    # Trains the tiny config 30 steps through train.py, then evaluates the whole held-out split;
    # the notebook itself asserts its bits/byte equal train.py's final evaluation (1e-3).
    text = _execute("eval.ipynb", tmp_path)
    bpb = _number(r"^held-out bits/byte: ([0-9.]+)", text)
    # Untrained: log2(384) ≈ 8.6 bits per byte token; 30 steps get to ~4.7; xz gets ~2.
    assert math.isfinite(bpb) and 1.0 < bpb < 8.0, bpb
    assert "train.py logged" in text  # the cross-check ran


def test_kv_cache_notebook(tmp_path):
    text = _execute("kv_cache.ipynb", tmp_path)
    # 512 + 64 values per token per layer in bf16 (the V3 paper's figure).
    assert _number(r"^MLA bytes/token/layer: (\d+)", text) == 1152
    assert _number(r"^MHA \(128 K/V heads\)\s+([\d,]+) B", text.replace(",", "")) == 81920
    speedup = _number(r"^speed-up at \d+ tokens: ([0-9.]+)x", text)
    assert math.isfinite(speedup) and speedup > 0  # a ratio of wall times: not asserted > 1


@pytest.mark.slow
def test_load_balance_notebook(tmp_path):
    text = _execute("load_balance.ipynb", tmp_path)
    losses = [_number(rf"^{re.escape(name)}\s+([0-9.]+)", text)
              for name in ("aux-loss-free", "aux loss", "neither")]
    assert all(math.isfinite(x) and 0.5 < x < math.log(384) + 0.5 for x in losses), losses
    assert "wins on loss at equal or better balance:" in text


@pytest.mark.slow
def test_speculative_notebook(tmp_path):
    # Trains the tiny config (with its MTP module) 200 steps through train.py, then decodes at
    # batch 1; the notebook itself asserts every speculative output equals plain greedy's.
    text = _execute("speculative.ipynb", tmp_path)
    speedup = _number(r"^speculative speedup: ([0-9.]+)x", text)
    acceptance = _number(r"^speculative speedup: [0-9.]+x, acceptance ([0-9.]+)", text)
    # A ratio of wall times (below 1 at the tiny scale on a CPU): not asserted > 1.
    assert math.isfinite(speedup) and speedup > 0, speedup
    assert math.isfinite(acceptance) and 0 < acceptance <= 1, acceptance
    assert "speculative outputs equal plain greedy's" in text
    # acceptance by draft position: counted per round, so each is a probability (nan: no round
    # reached that draft); one line per prompt type and draft depth K, K rates
    lines = re.findall(r"^code \(all\)\s+(\d)  ((?:\s*(?:[0-9.]+|nan))+)$", text, re.MULTILINE)
    assert {int(k) for k, _ in lines} == {1, 2, 3}, lines
    for k, rates in lines:
        rates = [float(r) for r in rates.split()]
        assert len(rates) == int(k) and all(math.isnan(r) or 0 <= r <= 1 for r in rates), rates
