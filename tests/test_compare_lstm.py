"""launch/compare_lstm.py: the LSTM's width matches the Transformer's parameter count, and the
held-out curves read from the runs' metrics become one plot (the runs themselves are
launch/pretrain.py, tested everywhere else; tests/test_lstm.py trains the LSTM)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

from megalm.config import load_config
from megalm.perf.flops import param_count
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_lstm", ROOT / "launch" / "compare_lstm.py")
compare_lstm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_lstm)


def test_lstm_width_is_the_closest_parameter_count():
    model = dataclasses.replace(load_config(ROOT / "configs" / "tiny.yaml").model, vocab_size=4096)
    lstm = compare_lstm.match_width(model)
    assert lstm.family == "lstm" and lstm.n_layers == 2 and lstm.d_model % 24 == 0
    gap = abs(param_count(lstm) - param_count(model))
    for d in (lstm.d_model - 24, lstm.d_model + 24):  # its neighbours are further away
        other = dataclasses.replace(lstm, d_model=d)
        assert abs(param_count(other) - param_count(model)) >= gap
    assert gap / param_count(model) < 0.05


def test_curves_are_read_per_evaluation_and_plotted(tmp_path):
    records = [{"step": 0, "val_loss": 8.3}, {"step": 10, "loss": 6.0, "tokens_per_s": 100.0},
               {"step": 10, "val_loss": 6.1}, {"step": 20, "loss": 5.0, "tokens_per_s": 300.0},
               {"step": 20, "val_loss": 5.2}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    points = compare_lstm.curve(tmp_path, tokens_per_step=4096)
    assert points == [(0, 8.3), (40960, 6.1), (81920, 5.2)]
    assert compare_lstm.tokens_per_second(tmp_path) == 200.0
    compare_lstm.plot({"a": points, "b": points}, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
