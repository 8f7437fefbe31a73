"""The parsers on the real benchmark files of shared/ (read in place, never copied)."""
from pathlib import Path

import pytest

from mindyouzhi.eval.tasks import TASKS, TaskOptions
from mindyouzhi.eval.tasks.classification import FPB, SST5, read_sentences
from mindyouzhi.eval.tasks.exam_csv import read_exam_csv
from mindyouzhi.eval.tasks.hellaswag import read_hellaswag

pytestmark = pytest.mark.shared


@pytest.mark.parametrize("benchmark, split, expected", [
    ("fineval", "dev", 170), ("fineval", "val", 3340), ("fineval", "test_20pct", 918),
    ("ceval", "dev", 260), ("ceval", "val", 1346),
])
def test_exam_splits_parse_completely(shared_dir, benchmark, split, expected):
    files = sorted((shared_dir / "data" / "eval" / benchmark / split).glob("*.csv"))
    assert sum(len(read_exam_csv(file)) for file in files) == expected


def test_every_exam_subject_has_five_dev_shots(shared_dir):
    for benchmark in ("fineval", "ceval"):
        items = TASKS[benchmark].load(shared_dir / "data" / "eval" / benchmark / "val", TaskOptions(shots=5, limit=1))
        assert len(items) == {"fineval": 34, "ceval": 52}[benchmark]
        assert all(item.context.count("答案：") == 6 for item in items)


def test_classification_and_hellaswag_files(shared_dir):
    data = Path(shared_dir) / "data" / "eval"
    assert len(read_sentences(data / "fpb" / "Sentences_AllAgree.txt", FPB)) == 2264
    assert len(read_sentences(data / "fpb" / "Sentences_50Agree.txt", FPB)) == 4846
    assert len(read_sentences(data / "sst5" / "stsa.fine.test", SST5)) == 2210
    assert len(read_hellaswag(data / "hellaswag" / "hellaswag_val_full.txt.bz2")) == 10042


def test_benchmark_root_folders_resolve_to_the_split_with_answers(shared_dir, capsys):
    """``--data fineval`` (the folder as downloaded: dev/ val/ test_20pct/) means its val split."""
    for benchmark, subjects in (("fineval", 34), ("ceval", 52)):
        root = shared_dir / "data" / "eval" / benchmark
        items = TASKS[benchmark].load(root, TaskOptions(shots=5, limit=1))
        assert len(items) == subjects and all(item.item_id.split(":")[0].endswith("_val.csv") for item in items)
        assert f"{root}: using the 'val' split" in capsys.readouterr().err
