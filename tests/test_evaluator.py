"""The score against hand-worked cases and against a plain re-implementation of the course's evaluator."""
import json
import os
import shutil

import pytest
import torch

from cli import UserError
from dataset import train_fingerprint
from evaluator import build_classifier, evaluation_model, topk_hits


def course_score(net, images, labels):
    """The course's evaluation_model.compute_acc, as published, with .cuda() removed."""
    with torch.no_grad():
        out = net(images)
    acc = total = 0
    for i in range(out.size(0)):
        k = int(labels[i].sum().item())
        total += k
        _, outi = out[i].topk(k)
        _, li = labels[i].topk(k)
        for j in outi:
            if j in li:
                acc += 1
    return acc / total


def multi_hot(*idx):
    y = torch.zeros(24)
    y[list(idx)] = 1
    return y


def test_hand_worked_scores_count_hits_among_the_k_highest_outputs():
    p = torch.zeros(3, 24)
    p[0, [3, 7]] = torch.tensor([0.9, 0.8])          # k = 2, both right
    p[1, [3, 5, 9]] = torch.tensor([0.9, 0.7, 0.6])  # k = 3, true {3, 9, 20}: top3 = {3, 5, 9} -> 2 hits
    p[2, [1, 2]] = torch.tensor([0.8, 0.8])          # k = 1, true {4}: a tie of two wrong classes -> 0 hits
    labels = torch.stack([multi_hot(3, 7), multi_hot(3, 9, 20), multi_hot(4)])
    hits, ks = topk_hits(p, labels)
    assert hits == [2, 2, 0] and ks == [2, 3, 1]
    assert sum(hits) / sum(ks) == pytest.approx(4 / 6)


def test_a_tie_between_two_true_classes_counts_both():
    p = torch.zeros(1, 24)
    p[0, [10, 11]] = 0.5
    hits, _ = topk_hits(p, multi_hot(10, 11)[None])
    assert hits == [2]


@pytest.fixture
def course_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = build_classifier().eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": net.state_dict()}, path)  # the course's format
    return net, str(path)


def test_random_checkpoint_in_course_format_scores_exactly_as_the_course_code(course_checkpoint):
    net, path = course_checkpoint
    g = torch.Generator().manual_seed(1)
    images = torch.rand(16, 3, 64, 64, generator=g) * 2 - 1
    labels = torch.zeros(16, 24)
    for i in range(16):
        labels[i, torch.randperm(24, generator=g)[: 1 + i % 3]] = 1
    ours = evaluation_model(path, "cpu").eval(images, labels)
    assert ours == course_score(net, images, labels)
    assert 0 <= ours <= 1


def test_the_default_classifier_is_torchvisions_resnet18_so_the_course_weights_load_as_they_are():
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Sequential(torch.nn.Linear(512, 24), torch.nn.Sigmoid())
    ours = build_classifier().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_missing_or_corrupt_classifier_weights_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        evaluation_model(str(tmp_path / "nope.pth"), "cpu")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable classifier"):
        evaluation_model(str(bad), "cpu")


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    from evaluator import frechet_from_stats, frechet_distance
    d = 5
    g = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov_b = m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    a = 2.0  # cov_a = a I commutes with everything: tr(S_a + S_b - 2 sqrt(a S_b)) via the eigenvalues of S_b
    lam = torch.linalg.eigvalsh(cov_b)
    expected = d * 1.0 + d * a + lam.sum().item() - 2 * (a ** 0.5) * lam.sqrt().sum().item()
    assert abs(frechet_from_stats(mu_a, a * torch.eye(d, dtype=torch.float64), mu_b, cov_b) - expected) < 1e-8
    assert abs(frechet_from_stats(mu_b, cov_b, mu_b, cov_b)) < 1e-8
    # from samples: two draws of the same Gaussian are close, a shifted one is |shift|^2 away
    x = torch.randn(20000, 3, generator=g)
    y = torch.randn(20000, 3, generator=g)
    assert frechet_distance(x, y) < 0.01
    assert abs(frechet_distance(x, x + torch.tensor([1.0, 0.0, 2.0])) - 5.0) < 1e-6  # same spread, shifted mean


@pytest.mark.parametrize("amx", [True, False])
def test_the_synthetic_sets_judge_trains_in_bf16_only_where_auto_says_so(amx, tiny_data, tmp_path, monkeypatch, capsys):
    import evaluator
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    out = tmp_path / "judge.pth"
    evaluator.train_classifier(evaluator.make_parser().parse_args(
        ["--train", "--data-dir", tiny_data, "--epochs", "1", "--batch-size", "16", "--out", str(out),
         "--device", "cpu"]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith(f"on cpu ({'bf16' if amx else 'fp32'})")
    with open(os.path.join(tiny_data, "test.json")) as f:
        n_test = len(json.load(f))  # every condition rendered twice: the judge reads all of the truth
    assert any(line.startswith("ground-truth renders of test:") and line.endswith(f"({2 * n_test} images)")
               for line in lines)
    saved = torch.load(out, weights_only=True)
    assert list(saved) == ["model", "data"]  # the course's format, plus the fingerprint of the images it learnt
    assert saved["data"] == train_fingerprint(tiny_data)


def test_a_judge_trained_on_other_images_is_trained_again_and_the_courses_weights_never(tiny_data, tmp_path,
                                                                                        monkeypatch, capsys):
    import evaluator
    from test_dataset import rerender_one_image
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("cache_*", "checkpoint.pth"))
    judge = os.path.join(data, "checkpoint.pth")
    evaluator.train_classifier(evaluator.make_parser().parse_args(
        ["--train", "--data-dir", data, "--epochs", "1", "--batch-size", "16", "--out", judge, "--device", "cpu"]))
    assert not evaluator.will_train_judge(data)  # trained on these very images
    rerender_one_image(data)
    assert evaluator.will_train_judge(data)
    assert not evaluator.will_train_judge(data, classifier=judge)  # a judge given by path is the user's choice
    trained = []
    monkeypatch.setattr(evaluator, "train_classifier", lambda args: trained.append(args.out))
    capsys.readouterr()
    assert evaluator.ensure_classifier(data, device="cpu") == judge and trained == [judge]
    assert "trained on other images" in capsys.readouterr().out
    torch.save({"model": torch.load(judge, weights_only=True)["model"]}, judge)  # the course's format: no 'data'
    assert not evaluator.will_train_judge(data)
