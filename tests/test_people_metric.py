"""The people measure beside FID: MTCNN face rate and confidence on generated images, Fréchet distance of face
crops. A real photo (scikit-image's astronaut) has a face; noise has none."""

import math

import numpy as np
import pytest
import torch
from skimage import data

from facediff.eval.metrics import ImageDistance
from facediff.eval.people import PeopleMetric


def astronaut(size=160, shift=0):
    image = torch.from_numpy(np.ascontiguousarray(data.astronaut()[:300, 50 + shift:350 + shift])).permute(2, 0, 1)
    image = torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)
    return image / 127.5 - 1


@pytest.fixture(scope="module")
def metric():
    return PeopleMetric(ImageDistance(None, fallback="mtcnn_onet"))


def test_faces_are_found_in_a_photo_and_not_in_noise(metric):
    noise = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0)) * 2 - 1
    faces = torch.cat([astronaut(), astronaut(shift=10), astronaut(shift=20)])
    boxes = torch.zeros(3, 8, 4)
    valid = torch.zeros(3, 8, dtype=torch.bool)
    boxes[:, 0] = torch.tensor([50.0, 20, 110, 100])  # around the astronaut's face at 160 px
    valid[:, 0] = True
    metric.update_real(faces, boxes, valid)
    metric.update_fake(torch.cat([faces, noise]))
    result = metric.compute()
    assert result["face_rate"] == pytest.approx(3 / 5)
    assert 0.9 <= result["face_confidence"] <= 1.0
    assert math.isfinite(result["face_fd_mtcnn_onet"]) and result["face_fd_mtcnn_onet"] >= 0

    metric.reset_fake()  # the real crops stay; a new generated set of noise only
    metric.update_fake(noise)
    again = metric.compute()
    assert again["face_rate"] == 0 and math.isnan(again["face_confidence"]) and math.isnan(again["face_fd_mtcnn_onet"])
