"""bench/compare.py's pure parts: flattening a bench report, which way is better, the verdict."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from compare import add_ratios, better_direction, compare, flatten, last_json_line, parse_ratio, replay  # noqa: E402


def test_flatten_keys_lists_of_points_by_their_labels_not_position():
    report = {"bench": "backends", "met": True, "points": {"ebpf": [{"backend": "ebpf", "pods": 10, "gbps": 6.2},
                                                                    {"backend": "ebpf", "pods": 100, "gbps": 6.0}]},
              "sizes": [10, 100]}
    flat = flatten(report)
    assert flat["points.ebpf[ebpf/10].gbps"] == 6.2
    assert flat["points.ebpf[ebpf/100].gbps"] == 6.0
    assert flat["sizes[0]"] == 10
    assert "met" not in flat and "bench" not in flat  # booleans and strings are not figures


def test_direction_is_read_from_the_figure_name_and_can_be_overridden():
    assert better_direction("mesh_gbps_1", None, None) == "higher"
    assert better_direction("added_rtt_p50_us", None, None) == "lower"
    assert better_direction("throughput_1s_vs_envoy", None, None) == "higher"
    assert better_direction("points.ebpf[ebpf/10].enrol_agent_ms", None, None) == "lower"
    assert better_direction("mystery", None, None) is None
    assert better_direction("mystery", re.compile("myst"), None) == "lower"


def test_verdict_uses_medians_and_the_allowed_worsening():
    base = [{"gbps": 10.0, "rtt_us": 100.0}, {"gbps": 9.0, "rtt_us": 110.0}, {"gbps": 11.0, "rtt_us": 90.0}]
    cand = [{"gbps": 9.6, "rtt_us": 120.0}, {"gbps": 2.0, "rtt_us": 104.0}, {"gbps": 9.7, "rtt_us": 106.0}]
    table = compare(base, cand, None, None, None, 5.0)
    assert table["gbps"]["base_median"] == 10.0 and table["gbps"]["cand_median"] == 9.6
    assert table["gbps"]["worse_pct"] == 4.0 and table["gbps"]["ok"] is True  # one bad run does not decide
    assert table["rtt_us"]["worse_pct"] == 6.0 and table["rtt_us"]["ok"] is False
    assert table["gbps"]["base_spread_pct"] == 10.0


def test_only_the_chosen_figures_are_judged_and_run_descriptions_are_skipped():
    base = [{"gbps": 10.0, "rtt_us": 100.0, "target_added_rtt_p50_us": 150.0, "cpus": 2.0}]
    cand = [{"gbps": 10.0, "rtt_us": 200.0, "target_added_rtt_p50_us": 150.0, "cpus": 2.0}]
    table = compare(base, cand, re.compile("gbps"), None, None, 5.0)
    assert table["rtt_us"]["judged"] is False and table["rtt_us"]["ok"] is None
    assert table["gbps"]["ok"] is True
    assert "target_added_rtt_p50_us" not in table and "cpus" not in table


def test_the_last_json_line_of_a_bench_output_is_its_report():
    out = 'table\n{"bench": "x", "a": 1}\nnoise {\n{"bench": "capture", "gbps": 2}\n'
    assert last_json_line(out) == {"bench": "capture", "gbps": 2}
    assert last_json_line("no report") is None


def test_nested_figures_take_their_direction_from_the_part_that_names_a_unit():
    assert better_direction("rtt_us.ambit.p50", None, None) == "lower"
    assert better_direction("throughput_gbps.1.ambit", None, None) == "higher"
    assert better_direction("idle_tunnel_kib.server_agent", None, None) == "lower"
    table = compare([{"added_rtt_target": 1.5, "x.y_target_kib": 64.0}], [{"added_rtt_target": 2.0,
                                                                        "x.y_target_kib": 64.0}],
                    None, None, None, 5.0)
    assert table == {}


def test_a_ratio_figure_divides_two_figures_of_the_same_run():
    ratio = parse_ratio("cpu_vs_envoy=cpu.ambit/cpu.envoy")
    assert ratio == ("cpu_vs_envoy", "cpu.ambit", "cpu.envoy")
    assert add_ratios({"cpu.ambit": 260.0, "cpu.envoy": 200.0}, [ratio])["cpu_vs_envoy"] == 1.3
    assert "cpu_vs_envoy" not in add_ratios({"cpu.ambit": 260.0, "cpu.envoy": 0.0}, [ratio])
    assert "cpu_vs_envoy" not in add_ratios({"cpu.ambit": 260.0}, [ratio])
    for bad in ("cpu.ambit/cpu.envoy", "x=cpu.ambit", "=a/b", "x=/b"):
        try:
            parse_ratio(bad)
        except Exception as exc:  # argparse.ArgumentTypeError
            assert "NAME=NUMERATOR/DENOMINATOR" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_a_log_replays_into_each_trees_reports_in_order_skipping_failed_runs():
    log = "\n".join([
        "=== /tmp/old hbone --quick cpus=all rc=0 36.3s",
        "table", '{"bench": "hbone", "cpu": 1}',
        "=== /tmp/new hbone --quick cpus=all rc=0 34.6s rev=abc1234",
        '{"not": "a report"}', '{"bench": "hbone", "cpu": 2}',
        "=== /tmp/new hbone --quick cpus=all rc=1 3.0s rev=abc1234",
        "Traceback (most recent call last):",
        "=== /tmp/new hbone --quick cpus=all rc=0 34.7s rev=abc1234",
        '{"bench": "hbone", "cpu": 3}',
        "=== /tmp/old hbone --quick cpus=all rc=0 37.3s",
        '{"bench": "hbone", "cpu": 4}',
    ])
    base, cand, base_runs, cand_runs, revs = replay(log)
    assert (str(base), str(cand)) == ("/tmp/old", "/tmp/new")
    assert [r["cpu"] for r in base_runs] == [1, 4]
    assert [r["cpu"] for r in cand_runs] == [2, 3]
    assert revs == {cand: "abc1234"}  # an older header names no commit
