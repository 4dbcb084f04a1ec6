import numpy as np
import torch
from PIL import Image

from dmkd.transforms import RandomHorizontalFlip, Resize, ToTensor


def _image_with_box(width=40, height=30, box=(5, 7, 15, 20)):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels), {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1])}


def _painted_extent(tensor):
    ys, xs = torch.nonzero(tensor[0] > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_resize_scales_boxes_with_the_image():
    image, target = _image_with_box(width=40, height=30, box=(4, 6, 16, 18))
    resized, out = Resize(20)(image, target)
    assert resized.size == (20, 15)
    assert torch.allclose(out["boxes"], torch.tensor([[2.0, 3.0, 8.0, 9.0]]))
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 6.0, 16.0, 18.0]]))  # input not modified


def test_flip_keeps_the_box_on_the_object():
    image, target = _image_with_box()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    tensor, _ = ToTensor()(flipped, out)
    assert out["boxes"][0].tolist() == _painted_extent(tensor)
    twice, back = RandomHorizontalFlip(p=1.0)(flipped, out)
    assert torch.equal(back["boxes"], target["boxes"])
    assert np.array_equal(np.asarray(twice), np.asarray(image))


def test_flip_probability_zero_is_identity():
    image, target = _image_with_box()
    same, out = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and out is target


def test_to_tensor_range():
    image, target = _image_with_box()
    tensor, _ = ToTensor()(image, target)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 30, 40)
    assert tensor.max() == 1.0 and tensor.min() == 0.0
