"""The strict configuration model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lwq.config import load_config, make_config, with_overrides
from lwq.errors import ConfigError


def test_defaults_and_yaml(tmp_path: Path) -> None:
    assert load_config(None).quant.bits == 4
    f = tmp_path / "c.yaml"
    f.write_text("quant:\n  bits: 3\n  group_size: 64\ncalib:\n  mode: parallel\n")
    c = load_config(f)
    assert (c.quant.bits, c.quant.group_size, c.calib.mode) == (3, 64, "parallel")
    assert c.flat()["quant.bits"] == 3


def test_unknown_keys_are_errors_that_name_them(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("quant:\n  bitz: 3\n")
    with pytest.raises(ConfigError, match=r"quant\.bitz: unknown setting"):
        load_config(f)
    with pytest.raises(ConfigError, match="modle: unknown setting"):
        make_config({"modle": "x"})


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"quant\.bits: .*one of \(2, 3, 4, 8\)"):
        make_config({"quant": {"bits": 5}})
    with pytest.raises(ConfigError, match=r"quant\.group_size"):
        make_config({"quant": {"group_size": 0}})
    with pytest.raises(ConfigError, match=r"calib\.mode"):
        make_config({"calib": {"mode": "both"}})
    with pytest.raises(ConfigError, match=r"method\.hi_bits=2 must exceed method\.lo_bits=2"):
        make_config({"method": {"hi_bits": 2, "lo_bits": 2}})
    with pytest.raises(ConfigError, match=r"method\.hi_bits=2 must exceed the 2 bits .*unset"):
        make_config({"method": {"hi_bits": 2}})
    with pytest.raises(ConfigError, match=r"method\.r_mid=0\.3 must be below method\.r_max"):
        make_config({"method": {"r_mid": 0.3, "r_max": 0.2}})
    with pytest.raises(ConfigError, match=r"method\.r_mid applies to method\.curve=power only"):
        make_config({"quant": {"method": "lwq"}, "method": {"r_mid": 0.1, "curve": "chord"}})
    with pytest.raises(ConfigError, match=r"method\.lwc_steps applies to method\.hi_refine=lwc"):
        make_config({"quant": {"method": "lwq"}, "method": {"lwc_steps": 5}})
    with pytest.raises(ConfigError, match=r"hi_refine=lwc .* does not apply to method\.hi_bits=16"):
        make_config({"quant": {"method": "lwq"}, "method": {"hi_refine": "lwc", "hi_bits": 16}})
    assert make_config({"quant": {"method": "lwq"}, "method": {"r_max": 0.2, "curve": "chord"}})


def test_overrides_and_required() -> None:
    c = with_overrides(make_config({}), {"quant.bits": 2, "model": "m", "calib.seed": None})
    assert c.quant.bits == 2 and c.model == "m" and c.calib.seed == 0
    # Overrides keep track of what was set, so later checks see only changed settings.
    assert c.quant.model_fields_set == {"bits"} and c.calib.model_fields_set == set()
    with pytest.raises(ConfigError, match=r"out is required \(or --out\)"):
        c.require("model", "out")


def test_broken_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("quant: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_commands_refuse_settings_they_would_ignore() -> None:
    run_cfg = make_config({"quant": {"method": "lwq"}, "calib": {"mode": "sequential"}})
    with pytest.raises(ConfigError, match=r"calib\.mode=sequential does not apply to lwq run"):
        run_cfg.check_for("run")
    run_cfg.check_for("quantize")
    make_config({"quant": {"method": "lwq"}, "calib": {"mode": "parallel"}}).check_for("run")
    with pytest.raises(ConfigError, match=r"out does not apply to lwq run"):
        make_config({"quant": {"method": "lwq"}, "out": "x"}).check_for("run")
    with pytest.raises(ConfigError, match=r"pipeline\.storage does not apply to lwq sweep"):
        make_config({"quant": {"method": "lwq"}, "pipeline": {"storage": "s"}}).check_for("sweep")
    with pytest.raises(ConfigError, match="lwq sweep runs the method"):
        make_config({}).check_for("sweep")


def test_one_window_rule_for_every_command() -> None:
    from types import SimpleNamespace

    from lwq.models import context_window

    assert context_window(SimpleNamespace(max_position_embeddings=8192)) == 2048
    assert context_window(SimpleNamespace(max_position_embeddings=256)) == 256
    assert context_window(SimpleNamespace()) == 2048
    assert context_window(SimpleNamespace(max_position_embeddings=8192), 512) == 512
    with pytest.raises(ConfigError, match="--seq-len 1"):
        context_window(SimpleNamespace(), 1)


def test_profile_settings_apply_to_their_estimator() -> None:
    with pytest.raises(ConfigError, match=r"method\.sketch_dim applies to method\.profile=forward"):
        make_config({"quant": {"method": "lwq"}, "method": {"sketch_dim": 64}})
    with pytest.raises(ConfigError, match=r"method\.profile_samples apply to method\.profile=rev"):
        make_config(
            {"quant": {"method": "lwq"}, "method": {"profile": "forward", "profile_samples": 64}}
        )
    cfg = make_config({"quant": {"method": "lwq"}, "method": {"profile": "forward"}})
    assert cfg.method.sketch_dim == 128


@pytest.mark.parametrize(
    ("budget", "group", "hi", "base"),
    [
        (2.5, 128, 4, 2),
        (3.0, 128, 4, 2),
        (3.24, 128, 4, 2),  # a 3-bit grid costs 3.148 at group 128: too little room
        (3.25, 128, 4, 3),
        (3.5, 128, 4, 3),
        (3.5, 32, 4, 2),  # 3.594 bits at group 32
        (3.7, 32, 4, 3),
        (3.5, 128, 3, 2),  # the base stays below the high grid
        (3.5, 128, 16, 3),
    ],
)
def test_one_unset_base_is_chosen_from_the_budget(
    budget: float, group: int, hi: int, base: int
) -> None:
    """Where a setting needs one base for all layers (here one fixed ratio)."""
    on = {"quant": {"method": "lwq"}}
    one = {"budget": budget, "group_size": group, "hi_bits": hi, "objective": "fixed"}
    m = make_config({**on, "method": one}).method
    assert m.lo_bits is None and m.chosen_bases() is None
    assert m.base_bits() == base
    assert m.grids()[0].bits == base
    assert m.for_budgets([budget]).lo_bits == base
    fixed = make_config({**on, "method": {"budget": budget, "lo_bits": 2}}).method
    assert fixed.base_bits() == 2 and fixed.for_budgets([2.5, 3.5]) is fixed


def test_every_layer_chooses_its_base_unless_one_base_is_asked_for() -> None:
    on = {"quant": {"method": "lwq"}}
    m = make_config({**on, "method": {"budget": 3.0}}).method
    assert m.chosen_bases() == (2, 3)
    assert [g.bits for g in m.base_grids()] == [2, 3]
    assert m.for_budgets([2.5, 3.5]) is m  # every budget shares the two bases
    for one in (
        {"lo_bits": 3},
        {"objective": "fixed"},
        {"profile": "forward"},
        {"ties": "inputs"},
        {"hi_bits": 3},  # only a 2-bit base lies below 3-bit high-impact weights
    ):
        assert make_config({**on, "method": one}).method.chosen_bases() is None, one
    assert make_config({**on, "method": {"bases": [2, 4], "hi_bits": 8}}).method.chosen_bases() == (
        2,
        4,
    )


@pytest.mark.parametrize(
    ("budget", "group", "floor", "offered"),
    [
        (2.5, 128, "budget", (2, 3)),
        (3.2, 128, "budget", (2, 3)),  # a 3-bit grid (3.15 bits) leaves less than 0.1
        (3.25, 128, "budget", (3,)),
        (3.5, 128, "budget", (3,)),
        (3.5, 32, "budget", (2, 3)),  # 3.59 bits at group 32: no room yet
        (3.5, 128, "none", (2, 3)),
    ],
)
def test_the_bases_offered_follow_the_budget(
    budget: float, group: int, floor: str, offered: tuple[int, ...]
) -> None:
    on = {"quant": {"method": "lwq"}}
    method = {"budget": budget, "group_size": group, "base_floor": floor}
    m = make_config({**on, "method": method}).method
    assert m.chosen_bases() == (2, 3)  # one profile serves every budget
    assert m.offered_bases() == offered
    wide = make_config({**on, "method": {"bases": [2, 3, 4], "hi_bits": 8, "budget": 4.5}}).method
    assert wide.offered_bases() == (4,) and wide.offered_bases(3.5) == (3, 4)


def test_a_base_floor_needs_several_bases() -> None:
    on = {"quant": {"method": "lwq"}}
    with pytest.raises(ConfigError, match=r"method\.base_floor applies to several bases"):
        make_config({**on, "method": {"lo_bits": 2, "base_floor": "none"}})


def test_budgets_that_need_different_bases_share_no_profile() -> None:
    m = make_config({"quant": {"method": "lwq"}, "method": {"objective": "fixed"}}).method
    assert m.for_budgets([2.25, 2.5, 3.0]).lo_bits == 2
    assert m.for_budgets([3.5, 4.0]).lo_bits == 3
    with pytest.raises(ConfigError, match=r"2\.5 -> 2 bits, 3\.5 -> 3 bits.*--lo-bits"):
        m.for_budgets([2.5, 3.5])
