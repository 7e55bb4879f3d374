"""Faithfulness metrics: a map that ranks the object first beats its reverse, a constant model cannot tell maps
apart, the curves start and end where the protocol says, and the fraction axis runs from 0 to 1."""
import pytest
import torch
from torch import nn

import faithfulness

SIDE = 16
OBJECT = (slice(5, 11), slice(5, 11))  # a 6 x 6 square, 36 of the 256 pixels


def object_image() -> torch.Tensor:
    """A normalised image: a bright square (2) on a slightly dark background (-0.2), in all three channels."""
    image = torch.full((1, 3, SIDE, SIDE), -0.2)
    image[:, :, OBJECT[0], OBJECT[1]] = 2.0
    return image


def brightness_model() -> nn.Module:
    """A tiny CNN whose class 0 ("object") logit grows with the mean brightness: 1x1 convolution, GAP, linear."""
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(1 / 3)
        model[0].bias.zero_()
        model[3].weight.copy_(torch.tensor([[4.0], [-4.0]]))
        model[3].bias.zero_()
    return model.eval()


def object_maps() -> dict[str, torch.Tensor]:
    on_object = torch.zeros(1, SIDE, SIDE)
    on_object[:, OBJECT[0], OBJECT[1]] = 1.0
    return {"object first": on_object, "object last": 1 - on_object}


def test_a_map_on_the_object_beats_its_reverse():
    results = faithfulness.evaluate(brightness_model(), object_image(), torch.tensor([0]), object_maps(), 8)
    first, last = results["object first"], results["object last"]
    assert first["deletion_auc"].item() < last["deletion_auc"].item() - 0.1
    assert first["insertion_auc"].item() > last["insertion_auc"].item() + 0.1
    assert first["drop"].item() == 0 and first["increase"].item()  # keeping the object alone raises the score
    assert last["drop"].item() > 0.5 and not last["increase"].item()


def test_one_image_has_no_standard_error_rather_than_zero():
    """The standard error of a mean of one value is undefined: once printed as ± 0.000, as if exact."""
    results = faithfulness.evaluate(brightness_model(), object_image(), torch.tensor([0]), object_maps(), 8)
    summary = faithfulness.summarize(results)
    assert all(row["deletion_auc_sem"] is None and row["insertion_auc_sem"] is None for row in summary.values())
    rows = faithfulness.format_table(summary).splitlines()[2:]
    assert len(rows) == 2 and all(row.count("± n/a") == 2 for row in rows)
    two = faithfulness.summarize(faithfulness.concat([results, results]))
    assert all(row["deletion_auc_sem"] == 0.0 for row in two.values())  # two equal values: an error of 0, shown


def test_a_constant_model_gives_every_map_the_same_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 10)).eval()
    nn.init.zeros_(model[1].weight)
    images = torch.randn(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 3, 3, 9])
    maps = {"random": torch.rand(4, SIDE, SIDE, generator=torch.Generator().manual_seed(2)),
            "centre": faithfulness.centred_gaussian((SIDE, SIDE)).expand(4, -1, -1), "flat": torch.zeros(4, SIDE, SIDE)}
    results = faithfulness.evaluate(model, images, classes, maps, 5)
    probabilities = model[1].bias.softmax(0)[classes].double()
    for result in results.values():
        for key in ("deletion_auc", "insertion_auc"):
            torch.testing.assert_close(result[key], probabilities)  # a flat curve at p has area p
        assert torch.equal(result["drop"], torch.zeros(4)) and not result["increase"].any()


def test_a_class_of_probability_zero_has_no_drop_rather_than_nan():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 2)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, -200.0]))  # exp(-200) underflows float32: probability 0
    maps = {"random": torch.rand(1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))}
    result = faithfulness.evaluate(model, object_image(), torch.tensor([1]), maps, 8)["random"]
    assert result["drop"].tolist() == [0.0] and result["deletion_auc"].tolist() == [0.0]


@pytest.mark.parametrize("num_pixels", [1024, 784, 256, 16])
def test_fractions_run_from_0_to_1_in_5_percent_steps(num_pixels):
    fractions = faithfulness.step_fractions(num_pixels)
    counts = faithfulness.step_counts(num_pixels)
    assert len(fractions) == len(counts) == 21 and fractions[0] == 0 and fractions[-1] == 1
    assert counts[-1] == num_pixels and (counts.diff() >= 0).all()
    if num_pixels >= 20:
        assert (fractions.diff() > 0).all()
        assert (fractions.diff() - 0.05).abs().max() <= 1 / num_pixels


def test_curves_start_and_end_where_the_protocol_says():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    images = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([1, 2, 7])
    maps = {"random": torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(2))}
    result = faithfulness.evaluate(model, images, classes, maps, 4)["random"]

    def probability(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).softmax(1)[torch.arange(3), classes]

    assert result["deletion"].shape == result["insertion"].shape == (3, 21)
    assert result["deletion_auc"].shape == result["drop"].shape == result["increase"].shape == (3,)
    torch.testing.assert_close(result["deletion"][:, 0], probability(images))  # nothing deleted yet
    torch.testing.assert_close(result["deletion"][:, -1], probability(torch.zeros_like(images)))  # all mean colour
    torch.testing.assert_close(result["insertion"][:, 0], probability(faithfulness.blur(images)))
    torch.testing.assert_close(result["insertion"][:, -1], probability(images))
    torch.testing.assert_close(result["deletion_auc"], torch.trapezoid(
        result["deletion"].double(), faithfulness.step_fractions(144), dim=1))
    masked = probability(images * maps["random"][:, None])
    torch.testing.assert_close(result["drop"], (probability(images) - masked).clamp(min=0) / probability(images))


def test_deletion_removes_the_best_ranked_pixels_first():
    maps = torch.tensor([[[0.5, 0.9], [0.1, 0.5]]])
    assert faithfulness.pixel_ranks(maps).tolist() == [[1, 0, 3, 2]]  # ties keep raster order
    images = torch.arange(1.0, 5.0).view(1, 1, 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()  # class 0 needs pixel 1, the map's best
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 5.0]))
    deletion = faithfulness.evaluate(model, images, torch.tensor([0]), {"map": maps}, 64)["map"]["deletion"][0]
    assert faithfulness.step_counts(4)[:4].tolist() == [0, 0, 0, 1]
    assert (deletion[:3] > 0.99).all()  # logits 20 vs 5 while pixel 1 is there
    assert (deletion[3:] < 0.01).all()  # the first pixel deleted is pixel 1: 0 vs 5


def test_centred_gaussian_peaks_in_the_middle_and_is_symmetric():
    bump = faithfulness.centred_gaussian((5, 7))
    assert bump.shape == (5, 7) and bump.argmax().item() == 2 * 7 + 3 and bump.max() == 1
    assert torch.equal(bump, bump.flip(0)) and torch.equal(bump, bump.flip(1))
    assert bump[0, 0] < bump[1, 1] < bump[2, 3]
