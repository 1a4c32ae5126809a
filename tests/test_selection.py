"""Selection criteria (METHOD.md §12) on constructed cases, pseudo-labels, the intermediate classifier."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cdp_fast import attacks, selection
from cdp_fast.pseudolabel import pseudo_label, train_classifier

SCALE = 10.0


def scaled_identity():
    """logits = SCALE * x for 3-pixel images [N, 3, 1, 1]."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        m[1].weight.copy_(SCALE * torch.eye(3))
    return m.eval()


# rows: confident, uniform, two-way tie-ish, fairly confident
IMAGES = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.6, 0.5, 0.0], [0.9, 0.2, 0.1]]).view(4, 3, 1, 1)


def test_entropy_and_separability_rankings():
    m = scaled_identity()
    ent = selection.scores(m, IMAGES, criterion="entropy")
    p = torch.softmax(SCALE * IMAGES.flatten(1), 1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(1))
    assert selection.select(m, IMAGES, None, "entropy", 2).tolist() == [1, 2]          # most uncertain
    assert selection.select(m, IMAGES, None, "entropy", 2, keep="low").tolist() == [0, 3]
    sep = selection.scores(m, IMAGES, criterion="separability")
    torch.testing.assert_close(sep, torch.tensor([10.0, 0.0, 1.0, 7.0]))
    assert selection.select(m, IMAGES, None, "separability", 3).tolist() == [0, 3, 2]  # most separable
    assert selection.select(m, IMAGES, None, "margin", 1, keep="low").tolist() == [1]


def test_gradnorm_matches_closed_form():
    m = scaled_identity()
    labels = torch.tensor([0, 0, 1, 2])
    g = selection.scores(m, IMAGES, labels, "gradnorm")
    # d CE / d x = W^T (p - onehot(y)) = SCALE * (p - onehot(y)) for this model
    p = torch.softmax(SCALE * IMAGES.flatten(1), 1)
    expect = (SCALE * (p - torch.eye(3)[labels])).norm(dim=1)
    torch.testing.assert_close(g, expect)
    assert selection.select(m, IMAGES, labels, "gradnorm", 4).tolist() == torch.argsort(expect, descending=True).tolist()
    # labels=None -> the model's own prediction
    g_pred = selection.scores(m, IMAGES, None, "gradient-norm")
    yp = p.argmax(1)
    torch.testing.assert_close(g_pred, (SCALE * (p - torch.eye(3)[yp])).norm(dim=1))


def test_gradnorm_rob_is_gradnorm_at_the_pgd_point():
    m = scaled_identity()
    labels = torch.tensor([0, 1, 0, 0])
    eps = 0.05
    rob = selection.scores(m, IMAGES, labels, "gradnorm-rob", eps=eps, steps=3, seed=9)
    x_adv = attacks.pgd(m, IMAGES, labels, eps=eps, steps=3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(rob, selection.scores(m, x_adv, labels, "gradnorm"))
    assert not torch.allclose(rob, selection.scores(m, IMAGES, labels, "gradnorm"))
    with pytest.raises(ValueError, match="eps"):
        selection.scores(m, IMAGES, labels, "gradnorm-rob")


def test_select_uint8_batched_and_errors():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    imgs = torch.randint(0, 256, (11, 3, 2, 2), dtype=torch.uint8)
    a = selection.scores(m, imgs, None, "entropy", batch_size=4)
    b = selection.scores(m, imgs.float() / 255, None, "entropy", batch_size=100)
    torch.testing.assert_close(a, b)
    idx = selection.select(m, imgs, None, "entropy", 5)
    assert idx.dtype == torch.int64 and len(set(idx.tolist())) == 5
    assert bool((a[idx].min() >= a[torch.tensor([i for i in range(11) if i not in idx.tolist()])].max()))
    with pytest.raises(ValueError, match="criterion"):
        selection.select(m, imgs, None, "loss", 3)
    with pytest.raises(ValueError, match="k must"):
        selection.select(m, imgs, None, "entropy", 12)
    with pytest.raises(ValueError, match="labels"):
        selection.scores(m, imgs, torch.zeros(3, dtype=torch.int64), "gradnorm")


def test_pseudo_label_batched():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    imgs = torch.randint(0, 256, (7, 3, 2, 2), dtype=torch.uint8)
    lab, conf = pseudo_label(m, imgs, batch_size=3)
    with torch.no_grad():
        p = torch.softmax(m(imgs.float() / 255), 1)
    assert lab.dtype == torch.int64 and lab.tolist() == p.argmax(1).tolist()
    torch.testing.assert_close(conf, p.max(1).values)
    with pytest.raises(ValueError, match="N, C, H, W"):
        pseudo_label(m, imgs[0])


def test_intermediate_classifier_learns_digits():
    from cdp_fast.data import load_dataset

    data = load_dataset("digits", real_limit=700)
    model = train_classifier(data, "small-cnn", epochs=10, batch_size=32, augment="none", device="cpu",
                             seed=0, show_progress=False)
    assert not model.training
    lab, conf = pseudo_label(model, data.x_test)
    acc = (lab == data.y_test).float().mean().item()
    assert acc > 0.75, f"intermediate classifier accuracy {acc:.3f} on digits"
    assert 0 < float(conf.min()) and float(conf.max()) <= 1
