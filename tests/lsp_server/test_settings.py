"""Settings from client JSON: camelCase or snake_case, nested or flat, bad values reported."""

from editkv.lsp_server.settings import AUTO, KV_BUDGET_MB, Settings, kv_budget_bytes, parse_settings


def test_camel_and_snake_case_nested_or_flat():
    s, problems = parse_settings({"editkv": {"maxTokens": 32, "num_drafts": 5, "multiline": "never"}})
    assert (s.max_tokens, s.num_drafts, s.multiline, problems) == (32, 5, "never", [])
    s, _ = parse_settings({"debounceMs": 0, "kvBudgetMb": 0, "cacheMode": "recompute"})
    assert (s.debounce_ms, s.budget_bytes, s.cache_mode) == (0, None, "recompute")


def test_bad_values_are_reported_and_replaced_by_the_current_ones():
    base = Settings(max_tokens=48)
    s, problems = parse_settings({"maxTokens": "lots", "numDrafts": 0, "multiline": "sometimes",
                                  "device": "tpu", "statsFile": "yes", "debounceMs": 1.5, "bogus": 1}, base)
    assert s == base
    text = "\n".join(problems)
    for name in ("maxTokens", "numDrafts", "multiline", "device", "statsFile", "debounceMs", "bogus"):
        assert f"editkv.{name}" in text
    assert "using 48" in text and "auto, never, always" in text


def test_none_and_non_objects():
    assert parse_settings(None) == (Settings(), [])
    s, problems = parse_settings([1, 2])
    assert s == Settings() and "must be an object" in problems[0]
    s, _ = parse_settings({"model": "", "dtype": None}, Settings(model="m", dtype="float32"))
    assert s.model is None and s.dtype is None


def test_model_key_covers_what_needs_a_reload():
    a = Settings()
    assert parse_settings({"maxTokens": 8}, a)[0].model_key == a.model_key
    assert parse_settings({"device": "cpu"}, a)[0].model_key != a.model_key


def test_decoding_switches_are_validated_booleans():
    s, problems = parse_settings({"speculation": False, "superposed": False, "adadec": True})
    assert (s.speculation, s.superposed, s.adadec, problems) == (False, False, True, [])
    assert (Settings().speculation, Settings().superposed, Settings().adadec) == (True, True, False)
    s, problems = parse_settings({"adadec": "on", "speculation": 1}, Settings(adadec=True))
    assert s == Settings(adadec=True)
    assert any("editkv.adadec: expected true or false" in p and "using True" in p for p in problems)
    assert any("editkv.speculation" in p for p in problems)


def test_staleness_settings_reach_the_cache_options():
    from editkv.lsp_server.worker import cache_options

    s, problems = parse_settings({"editkv": {"staleBudget": 0, "idleRefreshMs": 250, "fimFreshSuffix": 8}})
    assert not problems and s.stale_budget == 0 and s.idle_refresh_ms == 250
    assert cache_options(s)["options"].stale_budget is None  # 0: never refresh before a request
    assert cache_options(s)["tuned"]["fim_fresh_suffix"] == 8
    # unset: the backend takes the model's recommendation
    assert cache_options(Settings())["tuned"] == {"fim_fresh_suffix": None, "refresh_near_cursor": None}
    limited, problems = parse_settings({"multilineMs": 40})
    assert limited.multiline_ms == 40 and not problems
    assert parse_settings({"multilineMs": None}, limited)[0].multiline_ms is None  # back to the device's
    assert parse_settings({"multilineMs": -1})[1]  # out of range: reported
    back, problems = parse_settings({"fimFreshSuffix": None, "refreshNearCursor": 128}, s)
    assert not problems and back.fim_fresh_suffix is None and back.refresh_near_cursor == 128
    assert cache_options(Settings())["options"].stale_budget == 4096
    _, problems = parse_settings({"staleBudget": -1, "idleRefreshMs": "soon"})
    assert len(problems) == 2


def test_the_kv_budget_left_unset_is_the_devices():
    """kvBudgetMb unset (or set back to null) means the device's budget, 0 no limit, N that many MB."""
    assert Settings().budget_bytes == AUTO
    assert kv_budget_bytes(AUTO, "cpu") == KV_BUDGET_MB["cpu"] << 20
    assert kv_budget_bytes(AUTO, "cuda") == KV_BUDGET_MB["cuda"] << 20 > kv_budget_bytes(AUTO, "cpu")
    s, problems = parse_settings({"kvBudgetMb": 512})
    assert (kv_budget_bytes(s.budget_bytes, "cuda"), problems) == (512 << 20, [])
    assert kv_budget_bytes(parse_settings({"kvBudgetMb": 0})[0].budget_bytes, "cuda") is None
    s, problems = parse_settings({"kvBudgetMb": None}, s)
    assert (s.kv_budget_mb, s.budget_bytes, problems) == (None, AUTO, [])
    s, problems = parse_settings({"kvBudgetMb": -1}, s)
    assert s.kv_budget_mb is None and "kvBudgetMb" in problems[0]
