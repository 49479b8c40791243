"""The test harness reads logs while agents write them: a half-written last line is not an error."""
from tests.support.logfile import json_lines, read_json_lines


def test_a_half_written_last_line_waits_for_the_next_read(tmp_path):
    text = '{"event": "a", "n": 1}\nnot json\n{"event": "b"}\n{"event": "a", "n'
    assert json_lines(text) == [{"event": "a", "n": 1}, {"event": "b"}]
    assert json_lines(text.encode(), "a") == [{"event": "a", "n": 1}]
    log = tmp_path / "agent.log"
    assert read_json_lines(log) == []
    log.write_text(text)
    assert read_json_lines(log, "b", since=text.index("not")) == [{"event": "b"}]
