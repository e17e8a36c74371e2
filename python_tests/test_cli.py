"""The `balcony` command line: info (fast) and a train -> eval round trip on the real model (slow)."""

import json
import re

import pytest

from balcony_ext.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA kernels built:" in out and "CPU kernels:" in out


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--budget", "abc", "hi"], "argument --budget: a budget is a number in (0, 1], got 'abc'"),
    (["serve", "--port", "99999"], "argument --port: a port is an int in 0..65535, got '99999'"),
    (["bench", "--batch", "0"], "argument --batch: must be a positive int, got '0'"),
    (["bench", "--tokens", "-3"], "argument --tokens: must be a positive int, got '-3'"),
])
def test_bad_option_values_named_before_the_model_loads(argv, needle, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert needle in capsys.readouterr().err


def test_missing_file_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2  # (a FileNotFoundError traceback before)
    err = capsys.readouterr().err
    assert "balcony generate: error:" in err and "no config.json there" in err and "Traceback" not in err


def test_bad_choice_is_rejected():
    with pytest.raises(SystemExit):
        main(["train", "--init", "sideways"])  # argparse rejects an unknown choice


@pytest.mark.slow
def test_train_then_eval(tmp_path, capsys):
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(6):
        (text / f"doc{i}.txt").write_text(" ".join(f"Line {j} of document {i} tells a short story." for j in range(60)))
    exits = tmp_path / "exits.safetensors"
    assert main(["train", "--exits", "15", "--data", str(text), "--tokens", "512", "--seq-len", "64",
                 "--batch-size", "2", "--out", str(exits)]) == 0
    assert exits.exists()
    assert "trained exits [15]" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", "--exits-file", str(exits), "--data", str(text), "--seq-len", "64", "--max-tokens", "128",
                 "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    methods = {(r["method"], r["exit"]) for r in rows}
    assert any(m[1] == 15 for m in methods), methods
    assert all(r["perplexity"] > 1 for r in rows if "head" not in r)
    assert {(r["method"], r["exit"]) for r in rows if "head" in r} == {  # the shipped shortlist's routes
        (f"short{n // 1024}k", k) for n in (32768, 16384, 8192, 4096) for k in (15, 30)}

    # serve the trained exit: generate at it, calibrate, use the calibration, bench
    assert main(["generate", "--exits-file", str(exits), "--exit", "15", "--max-new-tokens", "5", "Hello"]) == 0
    out = capsys.readouterr().out
    assert "tokens at exit 15 of 30" in out
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--exits-file", str(exits), "--tokens", "4", "--out", str(cal)]) == 0
    ms = json.loads(cal.read_text())["ms_per_token"]
    assert set(ms) == {"15", "30"} and all(v > 0 for v in ms.values())
    assert main(["generate", "--exits-file", str(exits), "--calibration", str(cal), "--ms-per-token",
                 str(ms["30"] * 2), "--max-new-tokens", "3", "Hi"]) == 0
    assert "at exit 30 of 30" in capsys.readouterr().out
    assert main(["bench", "--exits-file", str(exits), "--tokens", "4", "--prompt-len", "8", "--no-hf"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "x full" in out
    assert main(["generate", "--exits-file", str(exits), "--budget", "1.5", "Hi"]) == 2
    assert "budget must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--exits-file", str(exits), "--frequency-penalty", "3", "Hi"]) == 2
    assert "frequency_penalty must be a number in [-2, 2]" in capsys.readouterr().err
    assert main(["generate", "--exits-file", str(exits), "--exit", "15", "--repetition-penalty", "1.3",
                 "--max-new-tokens", "4", "Hi"]) == 0
    capsys.readouterr()
    assert main(["generate", "--exits-file", str(exits), "--exit", "15", "--dry-multiplier", "0.8",
                 "--max-new-tokens", "4", "Hi"]) == 0
    capsys.readouterr()
    assert main(["generate", "--exits-file", str(exits), "--dry-multiplier", "-1", "Hi"]) == 2
    assert "dry_multiplier must be a number >= 0" in capsys.readouterr().err
    assert main(["generate", "--exits-file", str(exits), "--exit", "15", "--confidence", "1", "--max-new-tokens",
                 "4", "Hi"]) == 0  # every token is taken again at the full depth
    assert "4 tokens at exit 30 of 30, 4 taken again at the full depth (confidence below 1)" in capsys.readouterr().out
    assert main(["generate", "--exits-file", str(exits), "--confidence", "-0.5", "Hi"]) == 2
    assert "confidence must be a number in [0, 1]" in capsys.readouterr().err
    assert main(["generate", "--exits-file", str(exits), "--exit", "15", "--full-start", "2", "--max-new-tokens",
                 "5", "--frequency-penalty", "0.5", "Hi"]) == 0  # the opening at the full depth, then exit 15
    assert "5 tokens at exit 15/30 of 30, the first 2 at the full depth (its opening);" in capsys.readouterr().out
    # by default a budget spends an opening over --max-new-tokens where it fits
    assert main(["generate", "--exits-file", str(exits), "--budget", "0.8", "--max-new-tokens", "8", "Hi"]) == 0
    assert re.search(r"8 tokens at exit 15/30 of 30, .*the first [1-7] at the full depth \(its opening\)",
                     capsys.readouterr().out)
    assert main(["generate", "--exits-file", str(exits), "--budget", "0.8", "--max-new-tokens", "8",
                 "--full-start", "0", "Hi"]) == 0
    assert re.search(r"8 tokens at exit 15 of 30[;,]", capsys.readouterr().out)
    for bad in ("-1", "Auto", "2.5"):
        assert main(["generate", "--exits-file", str(exits), "--full-start", bad, "Hi"]) == 2
        assert "full_start must be 'auto' (a budget spends an opening where it fits), an int >= 0" in \
            capsys.readouterr().err


@pytest.mark.slow
def test_demo(capsys):
    assert main(["demo", "--max-new-tokens", "8", "--full-start", "0"]) == 0  # one budget per exit, and 1
    out = capsys.readouterr().out
    import json

    from balcony_ext.loading import bundled_exits_path

    exits = json.loads(bundled_exits_path().with_suffix(".eval.json").read_text())["info"]["exits"]
    assert f"exits at {exits}" in out and "speed-up" in out and "held-out ppl" in out and "chat top-1" in out
    assert "budget 1: the full model, " in out and "greedy, DRY 0.8" in out
    assert "budget 0.9: the full model with a 16,384-token head" in out  # the shipped shortlist's routes
    for k in exits:  # every exit answers at a budget of its own, with its chat agreement
        assert f": exit {k}" in out and "agrees with the full model on" in out


@pytest.mark.slow
def test_demo_with_confidence(capsys):
    assert main(["demo", "--budgets", "0.5", "--confidence", "0.3", "--max-new-tokens", "16", "--full-start", "0"]) == 0
    out = capsys.readouterr().out
    assert "confidence 0.3 (a token its exit is less sure of is taken again at the full depth)" in out
    assert "--- budget 0.5: exit 15 with a 16,384-token head (" in out and "the rest at the full depth)" in out


@pytest.mark.slow
def test_demo_with_full_start(capsys):
    assert main(["demo", "--budgets", "0.9", "0.7", "--full-start", "4", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "the first 4 answer tokens at the full depth at every budget" in out
    assert "--- budget 0.9: the full model with a 16,384-token head," in out  # (the route past the opening)
    assert "--- budget 0.7: exit 23 with a 8,192-token head after a 4-token opening at the full depth," in out


@pytest.mark.slow
def test_demo_spends_an_opening_by_default(capsys):
    assert main(["demo", "--budgets", "0.8", "0.5", "--max-new-tokens", "64"]) == 0
    out = capsys.readouterr().out
    import balcony_ext as bx
    from balcony_ext.budgets import load_calibration, plan_opening

    model = bx.load()
    for budget in (0.8, 0.5):  # the opening and route each budget's plan over 64 tokens makes
        K, (k, n), _ = plan_opening(model, budget, 64, load_calibration(model))
        assert 0 < K < 64 and k < model.num_layers and n
        assert (f"--- budget {budget:g}: exit {k} with a {n:,}-token head after a {K}-token opening at the full "
                "depth,") in out
    assert "opening" in out.split("speed-up")[0].splitlines()[-1]  # the table's column
