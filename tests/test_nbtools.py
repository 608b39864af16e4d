import ipywidgets as W
import pytest

from causalir import nbtools


def test_headless_interact_calls_once_with_defaults(monkeypatch, capsys):
    monkeypatch.setenv("CAUSALIR_HEADLESS", "1")
    calls = []
    out = nbtools.interact(lambda a, b, c, d: calls.append((a, b, c, d)), a=W.FloatSlider(value=0.3, min=0, max=1),
                           b=["x", "y"], c=(0, 10), d={"one": 1, "two": 2})
    assert out is None and calls == [(0.3, "x", 5, 1)]
    assert "headless run" in capsys.readouterr().out


def test_live_interact_returns_widget(monkeypatch):
    monkeypatch.delenv("CAUSALIR_HEADLESS", raising=False)
    calls = []
    w = nbtools.interact(lambda a: calls.append(a), a=W.IntSlider(value=2, min=0, max=4))
    assert calls == [2] and w is not None


def test_setup_rejects_unknown_profile():
    with pytest.raises(ValueError, match="valid profiles"):
        nbtools.setup("fast")
