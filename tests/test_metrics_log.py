"""metrics.jsonl holds each iteration once: a resumed run sets aside the rows of the iterations it redoes."""

import json

from megatron_glm.training.metrics import METRICS, REPLAYED, MetricsLogger, set_aside_replayed


def write(path, lines):
    path.write_text("".join(lines))


def test_rows_past_the_resume_point_move_to_the_replayed_file_and_nothing_is_lost(tmp_path):
    rows = [json.dumps({"iteration": i, "lm_loss": 10.0 - i}) + "\n" for i in range(1, 7)]
    write(tmp_path / METRICS, rows + ['{"iteration": 7, "lm_lo'])  # killed mid-line
    (tmp_path / REPLAYED).write_text(rows[5])  # from an earlier replay: kept, appended to
    assert set_aside_replayed(str(tmp_path), after=4) == 3
    assert (tmp_path / METRICS).read_text() == "".join(rows[:4])
    assert (tmp_path / REPLAYED).read_text() == rows[5] + rows[4] + rows[
        5
    ] + '{"iteration": 7, "lm_lo\n'


def test_a_run_that_starts_where_the_log_ends_moves_nothing(tmp_path):
    rows = [json.dumps({"iteration": i}) + "\n" for i in range(1, 4)]
    write(tmp_path / METRICS, rows)
    assert set_aside_replayed(str(tmp_path), after=3) == 0
    assert (tmp_path / METRICS).read_text() == "".join(rows) and not (tmp_path / REPLAYED).exists()


def test_the_logger_appends_after_the_resume_point(tmp_path):
    write(tmp_path / METRICS, [json.dumps({"iteration": i}) + "\n" for i in (1, 2, 3)])
    log = MetricsLogger(str(tmp_path), False, None, {}, True, start=2)
    log.record(3, {"lm_loss": 1.5})
    log.close()
    assert [json.loads(r)["iteration"] for r in (tmp_path / METRICS).read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert json.loads((tmp_path / REPLAYED).read_text())["iteration"] == 3
