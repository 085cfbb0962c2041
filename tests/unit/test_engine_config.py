"""The engine's config is its own (gru_serve.engine.config): the settings module reads nothing of
the engine, and the engine's defaults are the server settings' defaults."""

from __future__ import annotations

import ast
import inspect

import msgspec

from gru_serve.core.models import engine_config
from gru_serve.engine.config import EngineConfig
from gru_serve.ops import settings as settings_module
from gru_serve.ops.settings import Settings


def test_the_settings_import_nothing_of_the_engine():
    tree = ast.parse(inspect.getsource(settings_module))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in imported if m.startswith("gru_serve.engine")], imported


def test_the_engine_defaults_are_the_settings_defaults():
    assert engine_config(Settings()) == EngineConfig()


def test_the_engine_config_takes_the_settings_values_and_travels_as_json():
    config = engine_config(Settings(prefill_chunk=128, fused_tokens=1, device="cpu", round_budget_ms=5))
    assert (config.prefill_chunk, config.fused_tokens, config.device, config.round_budget_ms) == (
        128,
        1,
        "cpu",
        5.0,
    )
    assert msgspec.json.decode(msgspec.json.encode(config), type=EngineConfig) == config
