"""synthetic.py: the built-in synthetic faces (train.py's default data without FER2013, and the test suite's faces):
shapes and types, balanced classes in every split, one random stream per split, seeds, contrast."""
import torch

import synthetic
from conftest import check_splits


def test_synthetic_faces():
    a = synthetic.synthetic_faces(n_train=140, n_val=14, n_test=70, seed=1)
    check_splits(a, (140, 14, 70))
    assert torch.bincount(a["train"][1], minlength=7).tolist() == [20] * 7
    b = synthetic.synthetic_faces(n_train=70, n_val=14, n_test=70, seed=1)
    assert torch.equal(a["test"][0], b["test"][0])  # each split has its own stream
    c = synthetic.synthetic_faces(n_train=140, n_val=14, n_test=70, seed=2)
    assert not torch.equal(a["train"][0], c["train"][0])
    assert a["train"][0].float().std() > 30  # real contrast, not a blank canvas


def test_every_split_has_every_class_in_balance():
    """Each split's labels are its size spread over the 7 classes as evenly as it goes (counts differ by at most
    one), whatever the size."""
    d = synthetic.synthetic_faces(n_train=23, n_val=7, n_test=16, seed=4)
    for name, n in (("train", 23), ("val", 7), ("test", 16)):
        y = d[name][1]
        counts = torch.bincount(y, minlength=7)
        assert counts.sum() == n and len(counts) == 7 and counts.max() - counts.min() <= 1, (name, counts)
        assert counts.min() >= 1 and set(y.tolist()) == set(range(7))  # every class present
