"""The benchmarks' goal verdicts (benchmarks/benchlib.goal): judged on the exact value,
never on the rounded one shown (an image one block larger than mkfs.erofs's is 1.0000094
of it: NOT met, though it rounds to 1.000)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchlib import goal, goal_line  # noqa: E402


def test_a_miss_hidden_by_rounding_is_a_miss():
    g = goal("image size ratio", 434606080 / 434601984, "<=", 1.0)
    assert g["met"] is False and g["value"] > 1.0
    assert goal_line(g) == "goal image size ratio <= 1.0: NOT met (1.0000094)"
    g = goal("throughput", 0.69996, ">=", 0.7)
    assert g["met"] is False and g["value"] < 0.7


def test_plain_verdicts_round_to_three_places():
    assert goal("t", 0.93811, "<=", 1.0) == {"goal": "t <= 1.0", "value": 0.938, "met": True}
    assert goal_line(goal("t", 1.2, "<=", 1.0)) == "goal t <= 1.0: NOT met (1.200)"
    assert goal("x", 0.70004, ">=", 0.7)["met"] is True
