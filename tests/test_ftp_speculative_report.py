"""benchmarks/ftp_speculative.py's report: the answers' repeated n-grams, the column that tells a
faster decode after a pruned prefill from answers that merely turned repetitive."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("ftp_speculative", ROOT / "benchmarks" / "ftp_speculative.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repeated_share_counts_ngrams_that_repeat_an_earlier_one():
    share = _script().repeated_share
    assert share(list(range(20))) == 0.0
    assert share([1, 2, 3, 4, 1, 2, 3, 4]) == 1 - 4 / 5  # 5 4-grams, (1, 2, 3, 4) twice
    assert share([7] * 10) == 1 - 1 / 7
    assert share([1, 2, 3]) == 0.0  # shorter than one n-gram
    assert share([1, 2, 1, 2, 1], n=2) == 1 - 2 / 4


def test_report_shows_the_column_per_configuration():
    script = _script()
    records = []
    for qid, cat in ((1, "summarization"), (2, "rag")):
        for config, ids, tau in (("dense vanilla", list(range(12)), 1.0), ("FTP only", [5, 6, 7, 8] * 3, 1.0),
                                 ("speculative only", list(range(12)), 2.0), ("FTP + speculative", [5, 6, 7, 8] * 3, 3.0)):
            records.append({"question_id": qid, "category": cat, "config": config, "prompt_tokens": 10,
                            "new_tokens": len(ids), "ttft": 0.5, "seconds": 2.0, "tau": tau, "token_ids": ids,
                            "lossless": True, "differs_from_dense": config.startswith("FTP")})
    text = script.report(records, {"machine": {}, "settings": {}})
    assert "| repeated 4-grams |" in text
    rows = [line for line in text.splitlines() if line.startswith("| FTP only |")]
    assert len(rows) == 3 and all(row.split(" | ")[6] == f"{1 - 4 / 9:.2f}" for row in rows)
    assert [line for line in text.splitlines() if line.startswith("| dense vanilla |")][0].split(" | ")[6] == "0.00"
